//! Signals: what a till reports each minute for canary analysis, and the
//! bounds the agent and the control plane both keep.
//!
//! A till reports, per minute, counts of events and measured values, each
//! under a signal name. The agent's own signals are below; the point-of-sale
//! program adds its own names through the agent's local API.

/// Abnormal exits of the bundle's supervised program (a non-zero status or
/// a signal), counted by the agent.
pub const SERVICE_CRASHES: &str = "service_crashes";
/// Restarts of the supervised program by the agent.
pub const SERVICE_RESTARTS: &str = "service_restarts";
/// Seconds each periodic health check took.
pub const HEALTH_CHECK_SECONDS: &str = "health_check_seconds";
/// Periodic health checks that failed.
pub const HEALTH_CHECK_FAILURES: &str = "health_check_failures";

/// Names the agent reports itself; the program cannot report them.
pub const AGENT_SIGNALS: [&str; 4] = [
    SERVICE_CRASHES,
    SERVICE_RESTARTS,
    HEALTH_CHECK_SECONDS,
    HEALTH_CHECK_FAILURES,
];

/// Signal names per minute, counts and values together.
pub const MAX_NAMES: usize = 32;
/// Values kept per name and minute (a uniform sample when there are more).
pub const MAX_VALUES_PER_NAME: usize = 64;
/// Longest signal name.
pub const MAX_NAME_LEN: usize = 64;
/// Minutes one heartbeat carries at most.
pub const MAX_MINUTES_PER_HEARTBEAT: usize = 120;

/// Whether `name` is a valid signal name: 1 to 64 characters of a-z, 0-9
/// and `_`, starting with a letter.
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("failed_tenders"));
        assert!(valid_name("crashes2"));
        assert!(valid_name(&"a".repeat(MAX_NAME_LEN)));
        assert!(!valid_name(&"a".repeat(MAX_NAME_LEN + 1)));
        assert!(!valid_name(""));
        assert!(!valid_name("2crashes"));
        assert!(!valid_name("_x"));
        assert!(!valid_name("Failed"));
        assert!(!valid_name("card-read"));
        assert!(!valid_name("naïve"));
        for name in AGENT_SIGNALS {
            assert!(valid_name(name), "{name}");
        }
    }
}
