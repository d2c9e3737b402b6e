//! The errors of the shared rules and plumbing.

/// A maintenance window that cannot be applied, naming the bad value.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WindowError {
    #[error("unknown time zone `{0}`")]
    TimeZone(String),
    #[error("{0} must be 0 to 1439 (minutes after local midnight)")]
    Start(i64),
    #[error("{0} must be 1 to 1440")]
    Duration(i64),
}

impl WindowError {
    /// The window's field the error is about, as the API and the
    /// configuration name it.
    pub fn field(&self) -> &'static str {
        match self {
            WindowError::TimeZone(_) => "time_zone",
            WindowError::Start(_) => "start_minute",
            WindowError::Duration(_) => "duration_minutes",
        }
    }
}

/// A configuration problem, reported on one line naming the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.to_string(),
            message: message.into(),
        }
    }
}
