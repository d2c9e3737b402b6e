//! The supervisor's decisions, with no I/O: which programs to stop and
//! start so that what runs matches the active versions, and how long to
//! wait before a restart.

use semver::Version;
use std::collections::BTreeMap;
use std::time::Duration;

/// A program that ran at least this long was not a quick crash: the
/// restart delay goes back to the manifest's.
pub const QUICK_CRASH: Duration = Duration::from_secs(30);
/// Longest restart delay reached by doubling; a manifest's longer
/// `restart_delay_seconds` is kept as it is.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What to change so that the running versions are the wanted ones: the
/// bundles to stop first (gone, or another version wanted), then those to
/// start (wanted, and not running once the stops are done).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub stop: Vec<String>,
    pub start: Vec<String>,
}

pub fn reconcile(
    running: &BTreeMap<String, Version>,
    wanted: &BTreeMap<String, Version>,
) -> Changes {
    let stop: Vec<String> = running
        .iter()
        .filter(|(name, version)| wanted.get(*name) != Some(version))
        .map(|(name, _)| name.clone())
        .collect();
    let start = wanted
        .iter()
        .filter(|(name, version)| running.get(*name) != Some(version))
        .map(|(name, _)| name.clone())
        .collect();
    Changes { stop, start }
}

/// The pause before a restart: the manifest's delay, doubled for each
/// quick crash in a row before this one, at most [`MAX_BACKOFF`] (or the
/// manifest's delay, when longer).
pub fn restart_delay(base: Duration, quick_crashes_before: u32) -> Duration {
    let cap = base.max(MAX_BACKOFF);
    base.saturating_mul(2u32.saturating_pow(quick_crashes_before.min(16)))
        .min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versions(list: &[(&str, &str)]) -> BTreeMap<String, Version> {
        list.iter()
            .map(|(name, version)| (name.to_string(), version.parse().unwrap()))
            .collect()
    }

    #[test]
    fn what_runs_follows_the_active_versions() {
        let check =
            |running: &[(&str, &str)], wanted: &[(&str, &str)], stop: &[&str], start: &[&str]| {
                assert_eq!(
                    reconcile(&versions(running), &versions(wanted)),
                    Changes {
                        stop: stop.iter().map(|s| s.to_string()).collect(),
                        start: start.iter().map(|s| s.to_string()).collect(),
                    },
                    "{running:?} → {wanted:?}"
                );
            };
        check(&[], &[], &[], &[]);
        check(&[], &[("pos-app", "1.0.0")], &[], &["pos-app"]);
        check(&[("pos-app", "1.0.0")], &[("pos-app", "1.0.0")], &[], &[]);
        // A new version (an install, a rollback): the old one stops first.
        check(
            &[("pos-app", "1.0.0")],
            &[("pos-app", "1.1.0")],
            &["pos-app"],
            &["pos-app"],
        );
        // A bundle whose version has no service any more, or none active.
        check(
            &[("pos-app", "1.0.0"), ("scale", "2.0.0")],
            &[("scale", "2.0.0")],
            &["pos-app"],
            &[],
        );
    }

    #[test]
    fn restarts_back_off_on_quick_crashes_up_to_a_cap() {
        let s = Duration::from_secs;
        for (base, quick, expected) in [
            (1, 0, 1),
            (1, 1, 2),
            (1, 3, 8),
            (1, 6, 60),
            (1, 1000, 60),
            (5, 2, 20),
            (120, 0, 120),
            (120, 5, 120),
        ] {
            assert_eq!(
                restart_delay(s(base), quick),
                s(expected),
                "{base} s, {quick}"
            );
        }
    }
}
