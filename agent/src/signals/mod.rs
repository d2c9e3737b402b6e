//! Signals from the till: what the point-of-sale program and the agent
//! observe each minute (counts of events, measured values), for canary
//! analysis on the control plane.
//!
//! - `collector`: per-minute buckets with their caps, and the backlog of
//!   finished minutes that heartbeats carry until one is acknowledged;
//! - `line`: the local API's statsd-like line format;
//! - `socket`: the local API, a Unix datagram socket the program writes
//!   lines to, and the client `posfleet-agent signal` uses;
//! - `command`: `posfleet-agent signal LINE...`.
//!
//! [`Signals`] is the handle every part of the agent records through.

mod collector;
pub mod command;
pub mod line;
pub mod socket;

pub use collector::{BACKLOG_MINUTES, Batch, Collector};
pub use line::{LineError, Report, parse_line};

use posfleet_proto::v1::{HeartbeatRequest, SignalMinute};
use prost::Message;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How often the minute being filled is checked against the clock: well
/// under a minute, so every minute the agent runs is one.
const TICK: Duration = Duration::from_secs(1);

/// The signals of this till, shared by the local API, the supervisor and
/// the heartbeat. Each call holds the lock for a few map operations.
#[derive(Clone)]
pub struct Signals {
    collector: Arc<Mutex<Collector>>,
    /// The current minute: [`now_minute`], or a test's.
    clock: Arc<dyn Fn() -> i64 + Send + Sync>,
}

impl Default for Signals {
    fn default() -> Self {
        Signals::with_clock(now_minute)
    }
}

/// The current minute since the Unix epoch (UTC), by the system clock.
pub fn now_minute() -> i64 {
    chrono::Utc::now().timestamp().div_euclid(60)
}

impl Signals {
    pub fn new() -> Signals {
        Signals::default()
    }

    /// Signals whose minutes come from `clock` (minutes since the Unix
    /// epoch), for tests.
    pub fn with_clock(clock: impl Fn() -> i64 + Send + Sync + 'static) -> Signals {
        Signals {
            collector: Arc::default(),
            clock: Arc::new(clock),
        }
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }

    fn lock(&self) -> MutexGuard<'_, Collector> {
        // A panic while holding the lock leaves whole maps behind (every
        // change is one map operation): the data stays usable.
        self.collector
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds `n` to the count of `name` this minute.
    pub fn count(&self, name: &str, n: u64) {
        let minute = self.now();
        self.lock().count(minute, name, n);
    }

    /// Records a value of `name` this minute.
    pub fn value(&self, name: &str, value: f64) {
        let minute = self.now();
        self.lock()
            .value(minute, name, value, &mut rand::thread_rng());
    }

    /// Records a report of the program.
    pub fn report(&self, report: Report) {
        match report {
            Report::Count { name, n } => self.count(&name, n),
            Report::Value { name, value } => self.value(&name, value),
        }
    }

    /// Counts a report that was not kept.
    pub fn drop_one(&self) {
        self.lock().drop_one();
    }

    /// The next heartbeat's signals (see [`Collector::batch`]).
    pub fn batch(&self) -> Batch {
        let minute = self.now();
        let mut collector = self.lock();
        collector.tick(minute);
        collector.batch()
    }

    /// What the minute being filled holds so far, and the drops not yet
    /// reported.
    pub fn current(&self) -> (Option<SignalMinute>, u64) {
        let collector = self.lock();
        (collector.current(), collector.batch().dropped)
    }

    /// The heartbeat that carried `batch` was acknowledged.
    pub fn ack(&self, batch: &Batch) {
        self.lock().ack(batch);
    }

    /// Keeps what was not sent in `path` (the agent stops): the minute
    /// being filled is finished, and the next start takes them back with
    /// [`Signals::restore`].
    pub fn save(&self, path: &Path) -> Result<(), crate::Error> {
        let (signal_minutes, signals_dropped) = self.lock().finish();
        // The heartbeat's own fields, in its wire format.
        let kept = HeartbeatRequest {
            signal_minutes,
            signals_dropped,
            ..Default::default()
        };
        crate::files::write_private(path, &kept.encode_to_vec())
    }

    /// Takes back what [`Signals::save`] kept in `path`, once: the file is
    /// removed. A file that cannot be read is dropped with a warning.
    pub fn restore(&self, path: &Path) {
        let kept = match crate::files::read_optional(path) {
            Ok(Some(bytes)) => {
                HeartbeatRequest::decode(bytes.as_slice()).map_err(|e| e.to_string())
            }
            Ok(None) => return,
            Err(error) => Err(error.to_string()),
        };
        match kept {
            Ok(kept) => self
                .lock()
                .restore(kept.signal_minutes, kept.signals_dropped),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "Signals kept at the last stop are lost.")
            }
        }
        let _ = std::fs::remove_file(path);
    }

    /// Finishes each minute as the clock leaves it, until dropped (the task
    /// is aborted with the returned handle).
    pub fn spawn_ticker(&self) -> tokio::task::JoinHandle<()> {
        let signals = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let minute = signals.now();
                signals.lock().tick(minute);
            }
        })
    }
}
