//! Per-minute buckets of signals, and the backlog of finished minutes
//! waiting for an acknowledged heartbeat.
//!
//! Minutes are wall-clock UTC minutes (minutes since the Unix epoch). The
//! minute being filled is finished when the clock enters a later one; a
//! clock set back keeps filling the latest minute, so no minute is ever
//! reported twice. A minute the agent did not see (the till was asleep,
//! the clock jumped forward) is not made up: only minutes the agent ran in
//! are exposure.

use posfleet_proto::signals::{MAX_MINUTES_PER_HEARTBEAT, MAX_NAMES, MAX_VALUES_PER_NAME};
use posfleet_proto::v1::{SignalMinute, SignalValues};
use prost::Message;
use rand::Rng;
use std::collections::{BTreeMap, VecDeque};

/// Finished minutes kept until a heartbeat is acknowledged: 24 h. Beyond
/// it the oldest are dropped (and counted).
pub const BACKLOG_MINUTES: usize = 24 * 60;
/// Encoded bytes of minutes one heartbeat carries at most, so that a
/// heartbeat stays well within the control plane's message limit (64 KiB
/// by default) however much a till has to catch up on. A full minute
/// (every name with every value) is under 20 KiB.
pub const MAX_SIGNAL_BYTES_PER_HEARTBEAT: usize = 32 * 1024;

/// Values of one name in one minute: a uniform sample of at most
/// [`MAX_VALUES_PER_NAME`] of those reported (reservoir sampling).
#[derive(Debug, Clone, Default)]
struct Reservoir {
    /// Values reported in the minute, kept or not.
    seen: u64,
    kept: Vec<f64>,
}

impl Reservoir {
    fn add(&mut self, value: f64, rng: &mut impl Rng) {
        self.seen += 1;
        if self.kept.len() < MAX_VALUES_PER_NAME {
            self.kept.push(value);
            return;
        }
        // Each of the `seen` values so far is kept with the same chance,
        // MAX_VALUES_PER_NAME / seen.
        let slot = rng.gen_range(0..self.seen);
        if let Ok(slot) = usize::try_from(slot)
            && slot < MAX_VALUES_PER_NAME
        {
            self.kept[slot] = value;
        }
    }
}

/// The minute being filled.
#[derive(Debug, Clone)]
struct Bucket {
    minute: i64,
    counts: BTreeMap<String, u64>,
    values: BTreeMap<String, Reservoir>,
}

impl Bucket {
    fn new(minute: i64) -> Bucket {
        Bucket {
            minute,
            counts: BTreeMap::new(),
            values: BTreeMap::new(),
        }
    }

    /// Whether `name` may get an entry in `map`: it has one, or the minute
    /// holds fewer than [`MAX_NAMES`] entries, counts and values together.
    fn has_room<T>(&self, map: &BTreeMap<String, T>, name: &str) -> bool {
        map.contains_key(name) || self.counts.len() + self.values.len() < MAX_NAMES
    }

    fn finish(self) -> SignalMinute {
        SignalMinute {
            minute: self.minute,
            counts: self.counts.into_iter().collect(),
            values: self
                .values
                .into_iter()
                .map(|(name, reservoir)| {
                    (
                        name,
                        SignalValues {
                            values: reservoir.kept,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// What one heartbeat carries: the oldest finished minutes and the drops
/// not yet reported. Handed back to [`Collector::ack`] once the control
/// plane acknowledged it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub minutes: Vec<SignalMinute>,
    pub dropped: u64,
    /// Sequence number of the last minute in `minutes`.
    last: Option<u64>,
}

/// Signals by minute, and the finished minutes not yet acknowledged.
/// Names are taken as given: the local API checks them before they get
/// here.
#[derive(Debug)]
pub struct Collector {
    current: Option<Bucket>,
    /// Finished minutes, oldest first, each with its sequence number.
    backlog: VecDeque<(u64, SignalMinute)>,
    capacity: usize,
    next_seq: u64,
    /// Reports dropped and not yet acknowledged as reported.
    dropped: u64,
    /// The latest minute finished.
    last_finished: Option<i64>,
}

impl Default for Collector {
    fn default() -> Self {
        Collector::with_capacity(BACKLOG_MINUTES)
    }
}

impl Collector {
    /// A collector keeping at most `capacity` finished minutes (at least 1).
    pub fn with_capacity(capacity: usize) -> Collector {
        Collector {
            current: None,
            backlog: VecDeque::new(),
            capacity: capacity.max(1),
            next_seq: 0,
            dropped: 0,
            last_finished: None,
        }
    }

    /// Moves to `minute`: the minute being filled is finished if `minute`
    /// is later. Called at least once a minute while the agent runs, so
    /// that every minute it runs yields a [`SignalMinute`], even an empty
    /// one.
    pub fn tick(&mut self, minute: i64) {
        self.bucket(minute);
    }

    /// The bucket to fill at `minute` (see [`Collector::tick`]). A minute
    /// already finished (kept from before a restart in the same minute)
    /// is not filled again: the next one is.
    fn bucket(&mut self, minute: i64) -> &mut Bucket {
        let minute = match self.last_finished {
            Some(last) => minute.max(last.saturating_add(1)),
            None => minute,
        };
        if let Some(bucket) = self.current.take_if(|bucket| bucket.minute < minute) {
            self.push(bucket.finish());
        }
        self.current.get_or_insert_with(|| Bucket::new(minute))
    }

    fn push(&mut self, minute: SignalMinute) {
        if self.backlog.len() >= self.capacity {
            self.backlog.pop_front();
            self.dropped = self.dropped.saturating_add(1);
        }
        self.last_finished = Some(
            self.last_finished
                .map_or(minute.minute, |m| m.max(minute.minute)),
        );
        self.backlog.push_back((self.next_seq, minute));
        self.next_seq += 1;
    }

    /// Adds `n` to the count of `name` in `minute`; `false` (and counted as
    /// dropped) when the minute holds [`MAX_NAMES`] other names already.
    pub fn count(&mut self, minute: i64, name: &str, n: u64) -> bool {
        let bucket = self.bucket(minute);
        if !bucket.has_room(&bucket.counts, name) {
            self.drop_one();
            return false;
        }
        let bucket = self.bucket(minute);
        let count = bucket.counts.entry(name.to_string()).or_default();
        *count = count.saturating_add(n);
        true
    }

    /// Adds `value` to the values of `name` in `minute` (a sample of them
    /// beyond [`MAX_VALUES_PER_NAME`]); `false` (and counted as dropped)
    /// when the minute holds [`MAX_NAMES`] other names already.
    pub fn value(&mut self, minute: i64, name: &str, value: f64, rng: &mut impl Rng) -> bool {
        let bucket = self.bucket(minute);
        if !bucket.has_room(&bucket.values, name) {
            self.drop_one();
            return false;
        }
        self.bucket(minute)
            .values
            .entry(name.to_string())
            .or_default()
            .add(value, rng);
        true
    }

    /// Counts a report that was not kept (malformed, refused, over a cap).
    pub fn drop_one(&mut self) {
        self.dropped = self.dropped.saturating_add(1);
    }

    /// The next heartbeat's signals: the oldest finished minutes (at most
    /// [`MAX_MINUTES_PER_HEARTBEAT`], and at most
    /// [`MAX_SIGNAL_BYTES_PER_HEARTBEAT`] of them but always one) and the
    /// drops so far. Nothing is removed until [`Collector::ack`].
    pub fn batch(&self) -> Batch {
        let mut bytes = 0;
        let taken: Vec<&(u64, SignalMinute)> = self
            .backlog
            .iter()
            .take(MAX_MINUTES_PER_HEARTBEAT)
            .take_while(|(_, minute)| {
                // The minute, its field tag and its length.
                bytes += minute.encoded_len() + 4;
                bytes <= MAX_SIGNAL_BYTES_PER_HEARTBEAT || bytes == minute.encoded_len() + 4
            })
            .collect();
        Batch {
            last: taken.last().map(|(seq, _)| *seq),
            minutes: taken.into_iter().map(|(_, m)| m.clone()).collect(),
            dropped: self.dropped,
        }
    }

    /// The heartbeat carrying `batch` was acknowledged: its minutes leave
    /// the backlog (those dropped for room meanwhile are gone already) and
    /// its drops are reported.
    pub fn ack(&mut self, batch: &Batch) {
        if let Some(last) = batch.last {
            while self.backlog.front().is_some_and(|(seq, _)| *seq <= last) {
                self.backlog.pop_front();
            }
        }
        self.dropped = self.dropped.saturating_sub(batch.dropped);
    }

    /// Finishes the minute being filled (the agent stops), and returns
    /// every finished minute not yet acknowledged and the drops not yet
    /// reported, to keep until the next start.
    pub fn finish(&mut self) -> (Vec<SignalMinute>, u64) {
        if let Some(bucket) = self.current.take() {
            self.push(bucket.finish());
        }
        (
            self.backlog.iter().map(|(_, m)| m.clone()).collect(),
            self.dropped,
        )
    }

    /// Takes back what [`Collector::finish`] returned at the last stop,
    /// before anything is recorded.
    pub fn restore(&mut self, minutes: Vec<SignalMinute>, dropped: u64) {
        for minute in minutes {
            self.push(minute);
        }
        self.dropped = self.dropped.saturating_add(dropped);
    }

    /// What the minute being filled holds so far.
    pub fn current(&self) -> Option<SignalMinute> {
        self.current.clone().map(Bucket::finish)
    }

    /// Finished minutes waiting for a heartbeat.
    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    fn minutes(batch: &Batch) -> Vec<i64> {
        batch.minutes.iter().map(|m| m.minute).collect()
    }

    #[test]
    fn every_minute_seen_is_a_minute_even_empty_and_only_finished_ones_go_out() {
        let mut c = Collector::default();
        c.count(100, "transactions", 2);
        c.count(100, "transactions", 3);
        c.value(100, "checkout_seconds", 1.5, &mut rng());
        assert_eq!(c.batch(), Batch::default(), "minute 100 is not finished");
        c.tick(101);
        c.tick(102);
        // The clock set back: minute 102 goes on filling.
        c.count(101, "failed_tenders", 1);
        // The till slept through 103 and 104: they are not made up.
        c.tick(105);
        let batch = c.batch();
        assert_eq!(minutes(&batch), [100, 101, 102]);
        assert_eq!(batch.minutes[0].counts["transactions"], 5);
        assert_eq!(batch.minutes[0].values["checkout_seconds"].values, [1.5]);
        assert!(batch.minutes[1].counts.is_empty() && batch.minutes[1].values.is_empty());
        assert_eq!(batch.minutes[2].counts["failed_tenders"], 1);
        assert_eq!(batch.dropped, 0);
    }

    #[test]
    fn a_minute_holds_at_most_max_names_counts_and_values_together() {
        let mut c = Collector::default();
        let mut rng = rng();
        for i in 0..MAX_NAMES / 2 {
            assert!(c.count(1, &format!("c{i}"), 1));
            assert!(c.value(1, &format!("v{i}"), 1.0, &mut rng));
        }
        assert!(!c.count(1, "one_more", 1));
        assert!(!c.value(1, "one_more", 1.0, &mut rng));
        // Names the minute holds still take reports.
        assert!(c.count(1, "c0", 1));
        assert!(c.value(1, "v0", 2.0, &mut rng));
        // A new minute has room again.
        assert!(c.count(2, "one_more", 1));
        let batch = c.batch();
        let first = &batch.minutes[0];
        assert_eq!(first.counts.len() + first.values.len(), MAX_NAMES);
        assert_eq!(first.counts["c0"], 2);
        assert_eq!(first.values["v0"].values, [1.0, 2.0]);
        assert_eq!(batch.dropped, 2);
    }

    #[test]
    fn values_beyond_the_cap_are_a_uniform_sample() {
        // 10 × the cap per minute, over many minutes: each value's position
        // in its minute is kept as often as any other.
        let mut c = Collector::default();
        let mut rng = rng();
        let per_minute = 10 * MAX_VALUES_PER_NAME;
        let rounds = 200;
        for minute in 0..rounds {
            for i in 0..per_minute {
                c.value(minute, "checkout_seconds", i as f64, &mut rng);
            }
        }
        c.tick(rounds);
        let mut kept_per_tenth = [0u32; 10];
        let mut seen = 0;
        loop {
            let batch = c.batch();
            if batch.minutes.is_empty() {
                break;
            }
            assert_eq!(batch.dropped, 0, "sampling is not dropping");
            for minute in &batch.minutes {
                let values = &minute.values["checkout_seconds"].values;
                assert_eq!(values.len(), MAX_VALUES_PER_NAME);
                for v in values {
                    kept_per_tenth[*v as usize * 10 / per_minute] += 1;
                }
            }
            seen += batch.minutes.len();
            c.ack(&batch);
        }
        assert_eq!(seen, rounds as usize);
        // Expected per tenth: 200 minutes × 64 / 10 = 1280; a sample that
        // kept the first (or the last) values would put them all in one.
        for kept in kept_per_tenth {
            assert!((1150..=1410).contains(&kept), "{kept_per_tenth:?}");
        }
    }

    #[test]
    fn a_heartbeat_carries_at_most_its_byte_budget_of_full_minutes() {
        let mut c = Collector::default();
        let mut rng = rng();
        let full_minutes = 10;
        for minute in 0..full_minutes {
            for name in 0..MAX_NAMES {
                for i in 0..MAX_VALUES_PER_NAME {
                    c.value(
                        minute,
                        &format!("a_rather_long_signal_name_{name}"),
                        i as f64 + 0.1,
                        &mut rng,
                    );
                }
            }
        }
        c.tick(full_minutes);
        let mut sent = Vec::new();
        loop {
            let batch = c.batch();
            if batch.minutes.is_empty() {
                break;
            }
            let bytes: usize = batch.minutes.iter().map(|m| m.encoded_len() + 4).sum();
            assert!(bytes <= MAX_SIGNAL_BYTES_PER_HEARTBEAT, "{bytes}");
            assert!(batch.minutes.len() < full_minutes as usize);
            sent.extend(minutes(&batch));
            c.ack(&batch);
        }
        // All of them, over several heartbeats, in order.
        assert_eq!(sent, (0..full_minutes).collect::<Vec<_>>());
    }

    #[test]
    fn what_a_stop_leaves_unsent_is_taken_back_at_the_next_start() {
        let mut c = Collector::default();
        c.count(1, "transactions", 1);
        c.tick(2);
        c.ack(&c.batch());
        c.count(2, "transactions", 2);
        c.tick(3);
        c.count(3, "transactions", 3);
        c.drop_one();
        let (kept, dropped) = c.finish();
        let mut next = Collector::default();
        next.restore(kept, dropped);
        // Started again within minute 3: minute 3 is not reported twice.
        next.count(3, "transactions", 4);
        next.tick(5);
        let batch = next.batch();
        assert_eq!(minutes(&batch), [2, 3, 4]);
        assert_eq!(batch.minutes[1].counts["transactions"], 3);
        assert_eq!(batch.minutes[2].counts["transactions"], 4);
        assert_eq!(batch.dropped, 1);
    }

    #[test]
    fn the_backlog_drops_its_oldest_minutes_and_counts_them() {
        let mut c = Collector::with_capacity(3);
        for minute in 0..6 {
            c.count(minute, "transactions", 1);
        }
        c.tick(6);
        let batch = c.batch();
        assert_eq!(minutes(&batch), [3, 4, 5]);
        assert_eq!(batch.dropped, 3);
        assert_eq!(c.backlog_len(), 3);
    }

    #[test]
    fn minutes_leave_only_once_acknowledged_oldest_first_a_heartbeats_worth_at_a_time() {
        let mut c = Collector::default();
        let total = MAX_MINUTES_PER_HEARTBEAT as i64 + 30;
        for minute in 0..=total {
            c.tick(minute);
        }
        c.drop_one();
        // A failed heartbeat: the next one sends the same again.
        let failed = c.batch();
        assert_eq!(failed.minutes.len(), MAX_MINUTES_PER_HEARTBEAT);
        assert_eq!(c.batch(), failed);
        assert_eq!(failed.dropped, 1);
        let sent = c.batch();
        // Minutes finish and reports drop while the heartbeat is in flight.
        c.tick(total + 1);
        c.drop_one();
        c.ack(&sent);
        let next = c.batch();
        assert_eq!(
            minutes(&next),
            (MAX_MINUTES_PER_HEARTBEAT as i64..=total).collect::<Vec<_>>()
        );
        assert_eq!(next.dropped, 1, "only the drop after the batch is left");
        c.ack(&next);
        assert_eq!(c.batch(), Batch::default());
    }

    #[test]
    fn an_ack_after_the_backlog_overflowed_removes_only_what_was_sent() {
        let mut c = Collector::with_capacity(4);
        for minute in 0..=4 {
            c.tick(minute);
        }
        let sent = c.batch();
        assert_eq!(minutes(&sent), [0, 1, 2, 3]);
        // Two more minutes while the heartbeat is in flight push 0 and 1 out.
        c.tick(5);
        c.tick(6);
        c.ack(&sent);
        let next = c.batch();
        assert_eq!(minutes(&next), [4, 5]);
        assert_eq!(next.dropped, 2);
    }
}
