//! What the lifecycle does next for one desired bundle, as a pure
//! function of the desired version, the active one, the last status, the
//! staged file and the window. No I/O: the engine (`engine.rs`) gathers
//! these, asks [`decide`] and carries the step out.

use semver::Version;

use super::model::{Desired, Status};

/// What to do next for one desired bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The desired version is active.
    Done,
    /// This version already failed for good; wait for another one.
    GivenUp,
    /// Lower than the active version: refused.
    RefuseDowngrade {
        active: Version,
    },
    Download,
    /// Not staged, and downloading may only happen inside the window.
    WaitToDownload,
    Install,
    /// Staged; waiting for the window.
    WaitToInstall,
}

/// The next step for `desired`, from what is on disk and the clock.
/// `kept`: this till has a slot of the desired version (it ran it before).
pub fn decide(
    desired: &Desired,
    active: Option<&Version>,
    last: Option<&Status>,
    kept: bool,
    staged: bool,
    window_open: bool,
) -> Step {
    if active == Some(&desired.version) {
        return Step::Done;
    }
    if let Some(last) = last
        && last.given_up
        && last.target_version.as_ref() == Some(&desired.version)
    {
        return Step::GivenUp;
    }
    // Never to a lower version, except a sanctioned rollback to one this
    // till ran before.
    if let Some(active) = active
        && *active > desired.version
        && !(desired.rollback && kept)
    {
        return Step::RefuseDowngrade {
            active: active.clone(),
        };
    }
    let may_install = window_open || desired.emergency;
    match (staged, may_install) {
        (true, true) => Step::Install,
        (true, false) => Step::WaitToInstall,
        (false, _) if may_install || desired.download_ahead => Step::Download,
        (false, _) => Step::WaitToDownload,
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::Phase;
    use super::*;
    use posfleet_bundle::manifest::Kind;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    fn want(version: &str, download_ahead: bool, emergency: bool) -> Desired {
        Desired {
            name: "pos-app".into(),
            version: v(version),
            kind: Kind::Software,
            download_ahead,
            emergency,
            rollback: false,
        }
    }

    fn given_up(version: &str) -> Status {
        Status {
            name: "pos-app".into(),
            kind: Kind::Software,
            active_version: Some(v("1.0.0")),
            target_version: Some(v(version)),
            phase: Phase::RolledBack,
            bytes_done: 0,
            bytes_total: 0,
            error: "health check failed".into(),
            updated_at_ms: 0,
            given_up: true,
            interrupted: 0,
            bytes_from_origin: 0,
            bytes_from_peers: 0,
            bytes_saved_by_delta: 0,
            delta_error: String::new(),
        }
    }

    #[test]
    fn decisions() {
        use Step::*;
        let rolled_back = given_up("1.1.0");
        // (desired, active, last status, staged, window open) -> step
        type Case<'a> = (
            Desired,
            Option<&'a str>,
            Option<&'a Status>,
            bool,
            bool,
            Step,
        );
        let cases: Vec<Case> = vec![
            (
                want("1.1.0", true, false),
                Some("1.1.0"),
                None,
                false,
                false,
                Done,
            ),
            (
                want("1.1.0", true, false),
                Some("1.0.0"),
                None,
                false,
                false,
                Download,
            ),
            (
                want("1.1.0", false, false),
                Some("1.0.0"),
                None,
                false,
                false,
                WaitToDownload,
            ),
            (
                want("1.1.0", false, false),
                Some("1.0.0"),
                None,
                false,
                true,
                Download,
            ),
            (
                want("1.1.0", true, false),
                Some("1.0.0"),
                None,
                true,
                false,
                WaitToInstall,
            ),
            (
                want("1.1.0", true, false),
                Some("1.0.0"),
                None,
                true,
                true,
                Install,
            ),
            (
                want("1.1.0", false, true),
                Some("1.0.0"),
                None,
                false,
                false,
                Download,
            ),
            (
                want("1.1.0", false, true),
                Some("1.0.0"),
                None,
                true,
                false,
                Install,
            ),
            (want("1.1.0", true, false), None, None, true, true, Install),
            (
                want("1.1.0", true, false),
                Some("1.0.0"),
                Some(&rolled_back),
                true,
                true,
                GivenUp,
            ),
            // A different version after a given-up one is tried.
            (
                want("1.1.1", true, false),
                Some("1.0.0"),
                Some(&rolled_back),
                false,
                true,
                Download,
            ),
            (
                want("1.0.0", true, true),
                Some("1.1.0"),
                None,
                true,
                true,
                RefuseDowngrade { active: v("1.1.0") },
            ),
        ];
        for (desired, active, last, staged, open, expected) in cases {
            let active = active.map(v);
            assert_eq!(
                decide(&desired, active.as_ref(), last, false, staged, open),
                expected,
                "{desired:?} active {active:?} staged {staged} open {open}"
            );
        }
    }

    #[test]
    fn only_a_rollback_to_a_kept_version_goes_lower() {
        let active = v("1.1.0");
        let mut back = want("1.0.0", true, false);
        // Not a rollback, or a version this till never ran: refused.
        for (rollback, kept) in [(false, true), (true, false), (false, false)] {
            back.rollback = rollback;
            assert_eq!(
                decide(&back, Some(&active), None, kept, true, true),
                Step::RefuseDowngrade {
                    active: active.clone()
                },
                "rollback {rollback} kept {kept}"
            );
        }
        back.rollback = true;
        assert_eq!(
            decide(&back, Some(&active), None, true, true, true),
            Step::Install
        );
        assert_eq!(
            decide(&back, Some(&active), None, true, false, false),
            Step::Download
        );
    }
}
