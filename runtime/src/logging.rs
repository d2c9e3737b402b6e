//! Logging for both programs: key/value lines on stderr, or JSON objects
//! by setting, filtered by a `tracing` directive such as `info` or
//! `posfleet_agent=debug,info`.

use crate::error::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Checks a `log_level` setting before anything starts.
pub fn check_log_level(level: &str) -> Result<(), ConfigError> {
    tracing_subscriber::EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|e| ConfigError::new("log_level", e.to_string()))
}

/// Somewhere else a process's log events go besides stderr (the agent's
/// own log store), filtered at the same level.
pub type ExtraLayer =
    Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

/// Sends the process's logs to stderr at `level` (checked by
/// [`check_log_level`]; a bad one logs nothing), in `format`; colours only
/// on a terminal.
pub fn init_tracing(level: &str, format: LogFormat) {
    init_tracing_with(level, format, None);
}

/// As [`init_tracing`], and to `extra` too.
pub fn init_tracing_with(level: &str, format: LogFormat, extra: Option<ExtraLayer>) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = || {
        tracing_subscriber::EnvFilter::try_new(level)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"))
    };
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let mut layers: Vec<ExtraLayer> = vec![match format {
        LogFormat::Json => stderr
            .json()
            .flatten_event(true)
            .with_filter(filter())
            .boxed(),
        LogFormat::Text => stderr.with_filter(filter()).boxed(),
    }];
    if let Some(extra) = extra {
        layers.push(extra.with_filter(filter()).boxed());
    }
    // Fails only when the process already has a subscriber, which it keeps.
    let _ = tracing_subscriber::registry().with(layers).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_are_checked_naming_the_key() {
        assert!(check_log_level("info").is_ok());
        assert!(check_log_level("posfleet_agent=debug,warn").is_ok());
        let err = check_log_level("info,=[").unwrap_err();
        assert_eq!(err.key, "log_level", "{err}");
    }
}
