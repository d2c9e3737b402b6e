//! The agent's own log lines into its log store: a `tracing` layer beside
//! the one that writes stderr. It never blocks and never fails the event:
//! lines go through a bounded channel to the store's task, and are dropped
//! (counted) when the task falls behind or is not running yet.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};

use super::store::{AGENT_SOURCE, Entry};

/// Lines waiting for the store's task.
const CAPACITY: usize = 4096;

/// The layer: add it to the subscriber (`init_tracing_with`).
pub struct Capture {
    lines: mpsc::Sender<Entry>,
    dropped: Arc<AtomicU64>,
}

/// The other end, handed to the agent: its store takes the lines.
pub struct Captured {
    pub(crate) lines: mpsc::Receiver<Entry>,
    /// Lines dropped because the channel was full.
    pub(crate) dropped: Arc<AtomicU64>,
}

/// A layer and the receiver of the lines it captures.
pub fn capture() -> (Capture, Captured) {
    let (tx, rx) = mpsc::channel(CAPACITY);
    let dropped = Arc::new(AtomicU64::new(0));
    (
        Capture {
            lines: tx,
            dropped: dropped.clone(),
        },
        Captured { lines: rx, dropped },
    )
}

/// `LEVEL target: message key=value …`, as one line.
#[derive(Default)]
struct Line {
    message: String,
    fields: String,
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _context: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut line = Line::default();
        event.record(&mut line);
        let metadata = event.metadata();
        let text = format!(
            "{} {}: {}{}",
            metadata.level(),
            metadata.target(),
            line.message,
            line.fields
        );
        if self
            .lines
            .try_send(Entry::new(AGENT_SOURCE, &text))
            .is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn events_become_one_line_each_with_their_fields() {
        let (layer, mut captured) = capture();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(device_id = "dev-1", attempts = 3, "Heartbeat sent.");
            tracing::warn!(error = %"boom\nagain", "Cannot reach it.");
        });
        let first = captured.lines.try_recv().unwrap();
        assert_eq!(first.source, "agent");
        assert!(
            first
                .text
                .ends_with("Heartbeat sent. device_id=dev-1 attempts=3"),
            "{}",
            first.text
        );
        assert!(first.text.starts_with("INFO "), "{}", first.text);
        let second = captured.lines.try_recv().unwrap();
        assert!(
            second.text.starts_with("WARN ") && second.text.ends_with("error=boom again"),
            "{}",
            second.text
        );
    }
}
