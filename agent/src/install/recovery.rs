//! The recovery decision: from a bundle's install journal and what is on
//! disk, what to change so that exactly one whole, confirmed version is
//! active. A pure function ([`decide`]): reading the disk and carrying the
//! plan out are `disk.rs`'s and `slots.rs`'s, so a crash while the plan is
//! carried out leads to the same plan again.

use semver::Version;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// What [`Slots::recover`](super::Slots::recover) did to one bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub name: String,
    pub action: RecoveryAction,
    /// The version active now, if any.
    pub active: Option<Version>,
    /// Why, in words for the report.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryAction {
    /// `version` had been activated but was not confirmed healthy: `current`
    /// went back to the version before it (or was removed, if none).
    RolledBack { version: Version },
    /// An install of `version` stopped before `current` was switched to it;
    /// its slot was removed.
    Abandoned { version: Version },
    /// `current` was missing or broken with no install in flight; it was set
    /// back to the last confirmed version (or removed).
    Repaired,
}

/// A bundle's journal: what is in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub(super) enum Journal {
    /// Nothing in flight; `active`, if any, was confirmed healthy.
    Stable { active: Option<Version> },
    /// `version` is whole in its slot and passed `pre_activate`; `current`
    /// is being (or was) switched to it from `previous`, and it is not
    /// confirmed healthy.
    Activating {
        version: Version,
        previous: Option<Version>,
    },
    /// `version` was found unhealthy; `current` is going back to `previous`.
    RollingBack {
        version: Version,
        previous: Option<Version>,
        reason: String,
    },
}

/// Where a `current` link points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Link {
    Missing,
    To(Version),
    /// Not a symbolic link, or not to a version.
    Broken(String),
}

/// What there is of one bundle on disk (temporary entries aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Disk {
    pub(super) current: Link,
    pub(super) slots: BTreeSet<Version>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkChange {
    Keep,
    Point(Version),
    Remove,
}

/// The changes that make one bundle consistent, in the order they are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    /// Written before anything else, so that a crash while the plan is
    /// carried out leads to the same plan again.
    pub(super) journal_first: Option<Journal>,
    pub(super) link: LinkChange,
    /// Slots to remove; never the one left active.
    pub(super) remove: Vec<Version>,
    /// Written last.
    pub(super) journal: Journal,
    pub(super) recovery: Option<Recovery>,
}

/// The recovery decision: from a bundle's journal and what is on disk, what
/// to change so that exactly one whole, confirmed version is active (or
/// none, when none was ever confirmed).
pub(super) fn decide(name: &str, journal: &Journal, disk: &Disk) -> Plan {
    let points_to = |v: &Version| disk.current == Link::To(v.clone()) && disk.slots.contains(v);
    let is_current = |target: Option<&Version>| match target {
        Some(v) => points_to(v),
        None => disk.current == Link::Missing,
    };
    // Makes `target` active if its slot is whole, else leaves none active.
    let restore = |target: Option<&Version>| match target {
        Some(v) if disk.slots.contains(v) => {
            let change = if points_to(v) {
                LinkChange::Keep
            } else {
                LinkChange::Point(v.clone())
            };
            (change, Some(v.clone()))
        }
        _ => {
            let change = if disk.current == Link::Missing {
                LinkChange::Keep
            } else {
                LinkChange::Remove
            };
            (change, None)
        }
    };
    let plan = |journal_first: Option<Journal>,
                (link, active): (LinkChange, Option<Version>),
                remove: &Version,
                recovery: Option<(RecoveryAction, String)>| {
        let remove = Some(remove)
            .filter(|v| disk.slots.contains(v) && Some(*v) != active.as_ref())
            .cloned()
            .into_iter()
            .collect();
        Plan {
            journal_first,
            link,
            remove,
            recovery: recovery.map(|(action, reason)| Recovery {
                name: name.to_string(),
                action,
                active: active.clone(),
                reason,
            }),
            journal: Journal::Stable { active },
        }
    };
    let nothing = |active: Option<Version>| Plan {
        journal_first: None,
        link: LinkChange::Keep,
        remove: Vec::new(),
        journal: Journal::Stable { active },
        recovery: None,
    };

    match journal {
        Journal::Stable { active } => match &disk.current {
            // What runs is what was confirmed last (or, with no journal,
            // what was installed before journals).
            Link::To(v) if disk.slots.contains(v) => nothing(Some(v.clone())),
            Link::Missing if active.is_none() => nothing(None),
            broken => {
                let (link, now) = restore(active.as_ref());
                let reason = format!(
                    "the `current` link {}; {}",
                    match broken {
                        Link::Missing => "was missing".to_string(),
                        Link::To(v) => format!("named {v}, which has no slot"),
                        Link::Broken(what) => what.clone(),
                    },
                    match &now {
                        Some(v) => format!("set back to {v}"),
                        None => "removed".to_string(),
                    }
                );
                Plan {
                    journal_first: None,
                    link,
                    remove: Vec::new(),
                    recovery: Some(Recovery {
                        name: name.to_string(),
                        action: RecoveryAction::Repaired,
                        active: now.clone(),
                        reason,
                    }),
                    journal: Journal::Stable { active: now },
                }
            }
        },
        Journal::Activating { version, previous } if is_current(previous.as_ref()) => plan(
            None,
            restore(previous.as_ref()),
            version,
            Some((
                RecoveryAction::Abandoned {
                    version: version.clone(),
                },
                format!("the agent stopped before activating {version}"),
            )),
        ),
        Journal::Activating { version, previous } => {
            let reason = format!("the agent stopped before {version} was confirmed healthy");
            plan(
                Some(Journal::RollingBack {
                    version: version.clone(),
                    previous: previous.clone(),
                    reason: reason.clone(),
                }),
                restore(previous.as_ref()),
                version,
                Some((
                    RecoveryAction::RolledBack {
                        version: version.clone(),
                    },
                    reason,
                )),
            )
        }
        Journal::RollingBack {
            version,
            previous,
            reason,
        } => plan(
            None,
            restore(previous.as_ref()),
            version,
            Some((
                RecoveryAction::RolledBack {
                    version: version.clone(),
                },
                reason.clone(),
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        Version::parse(text).unwrap()
    }

    fn disk(current: Link, slots: &[&str]) -> Disk {
        Disk {
            current,
            slots: slots.iter().map(|s| v(s)).collect(),
        }
    }

    fn to(text: &str) -> Link {
        Link::To(v(text))
    }

    fn stable(active: Option<&str>) -> Journal {
        Journal::Stable {
            active: active.map(v),
        }
    }

    fn activating(version: &str, previous: Option<&str>) -> Journal {
        Journal::Activating {
            version: v(version),
            previous: previous.map(v),
        }
    }

    fn rolling_back(version: &str, previous: Option<&str>) -> Journal {
        Journal::RollingBack {
            version: v(version),
            previous: previous.map(v),
            reason: "unhealthy".into(),
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Report {
        None,
        RolledBack,
        Abandoned,
        Repaired,
    }

    /// Checks what `decide` does: the link change, the slots removed, the
    /// version left active and what is reported.
    #[track_caller]
    fn check(
        journal: Journal,
        disk: Disk,
        link: LinkChange,
        removed: &[&str],
        active: Option<&str>,
        report: Report,
    ) {
        let plan = decide("pos-app", &journal, &disk);
        assert_eq!(plan.link, link, "link for {journal:?} {disk:?}");
        let removed: Vec<Version> = removed.iter().map(|s| v(s)).collect();
        assert_eq!(plan.remove, removed, "removed for {journal:?} {disk:?}");
        assert_eq!(
            plan.journal,
            stable(active),
            "journal for {journal:?} {disk:?}"
        );
        let got = match plan.recovery.as_ref().map(|r| &r.action) {
            None => Report::None,
            Some(RecoveryAction::RolledBack { .. }) => Report::RolledBack,
            Some(RecoveryAction::Abandoned { .. }) => Report::Abandoned,
            Some(RecoveryAction::Repaired) => Report::Repaired,
        };
        assert_eq!(got, report, "report for {journal:?} {disk:?}");
        if let Some(recovery) = &plan.recovery {
            assert_eq!(recovery.active, active.map(v));
        }
    }

    use LinkChange::{Keep, Point, Remove};

    #[test]
    fn nothing_in_flight() {
        check(
            stable(None),
            disk(Link::Missing, &[]),
            Keep,
            &[],
            None,
            Report::None,
        );
        check(
            stable(Some("1.0.0")),
            disk(to("1.0.0"), &["1.0.0"]),
            Keep,
            &[],
            Some("1.0.0"),
            Report::None,
        );
        // An older slot stays for the next install's clean-up.
        check(
            stable(Some("1.1.0")),
            disk(to("1.1.0"), &["1.0.0", "1.1.0"]),
            Keep,
            &[],
            Some("1.1.0"),
            Report::None,
        );
        // No journal (or an unreadable one): the link is the truth.
        check(
            stable(None),
            disk(to("1.0.0"), &["1.0.0"]),
            Keep,
            &[],
            Some("1.0.0"),
            Report::None,
        );
    }

    #[test]
    fn a_broken_link_goes_back_to_the_confirmed_version() {
        for current in [
            Link::Missing,
            Link::Broken("was not a symbolic link".into()),
            to("1.1.0"),
        ] {
            check(
                stable(Some("1.0.0")),
                disk(current.clone(), &["1.0.0"]),
                Point(v("1.0.0")),
                &[],
                Some("1.0.0"),
                Report::Repaired,
            );
            // Nothing confirmed to go back to.
            let link = if current == Link::Missing {
                Keep
            } else {
                Remove
            };
            check(
                stable(Some("0.9.0")),
                disk(current, &["1.0.0"]),
                link,
                &[],
                None,
                Report::Repaired,
            );
        }
    }

    #[test]
    fn stopped_before_the_switch() {
        // The journal was written, `current` not switched yet.
        check(
            activating("1.1.0", Some("1.0.0")),
            disk(to("1.0.0"), &["1.0.0", "1.1.0"]),
            Keep,
            &["1.1.0"],
            Some("1.0.0"),
            Report::Abandoned,
        );
        check(
            activating("1.0.0", None),
            disk(Link::Missing, &["1.0.0"]),
            Keep,
            &["1.0.0"],
            None,
            Report::Abandoned,
        );
        // A second recovery: the slot is already gone.
        check(
            activating("1.1.0", Some("1.0.0")),
            disk(to("1.0.0"), &["1.0.0"]),
            Keep,
            &[],
            Some("1.0.0"),
            Report::Abandoned,
        );
    }

    #[test]
    fn stopped_before_the_confirmation() {
        check(
            activating("1.1.0", Some("1.0.0")),
            disk(to("1.1.0"), &["1.0.0", "1.1.0"]),
            Point(v("1.0.0")),
            &["1.1.0"],
            Some("1.0.0"),
            Report::RolledBack,
        );
        // The first install of the bundle: nothing to go back to.
        check(
            activating("1.0.0", None),
            disk(to("1.0.0"), &["1.0.0"]),
            Remove,
            &["1.0.0"],
            None,
            Report::RolledBack,
        );
        // `current` broken: the previous version, whatever it names.
        check(
            activating("1.1.0", Some("1.0.0")),
            disk(Link::Broken("pointed to `x`".into()), &["1.0.0", "1.1.0"]),
            Point(v("1.0.0")),
            &["1.1.0"],
            Some("1.0.0"),
            Report::RolledBack,
        );
        // The previous slot is gone (not something installs do): no
        // unconfirmed version stays active.
        check(
            activating("1.1.0", Some("1.0.0")),
            disk(to("1.1.0"), &["1.1.0"]),
            Remove,
            &["1.1.0"],
            None,
            Report::RolledBack,
        );
        // The way back is journaled first, with its reason.
        let plan = decide(
            "pos-app",
            &activating("1.1.0", Some("1.0.0")),
            &disk(to("1.1.0"), &["1.0.0", "1.1.0"]),
        );
        let reason = "the agent stopped before 1.1.0 was confirmed healthy";
        assert_eq!(
            plan.journal_first,
            Some(Journal::RollingBack {
                version: v("1.1.0"),
                previous: Some(v("1.0.0")),
                reason: reason.into(),
            })
        );
        assert_eq!(plan.recovery.unwrap().reason, reason);
    }

    #[test]
    fn stopped_while_rolling_back() {
        for (current, slots, link, removed) in [
            (
                to("1.1.0"),
                &["1.0.0", "1.1.0"][..],
                Point(v("1.0.0")),
                &["1.1.0"][..],
            ),
            (to("1.0.0"), &["1.0.0", "1.1.0"], Keep, &["1.1.0"]),
            (to("1.0.0"), &["1.0.0"], Keep, &[]),
        ] {
            check(
                rolling_back("1.1.0", Some("1.0.0")),
                disk(current, slots),
                link,
                removed,
                Some("1.0.0"),
                Report::RolledBack,
            );
        }
        check(
            rolling_back("1.0.0", None),
            disk(Link::Missing, &["1.0.0"]),
            Keep,
            &["1.0.0"],
            None,
            Report::RolledBack,
        );
        let plan = decide(
            "pos-app",
            &rolling_back("1.1.0", Some("1.0.0")),
            &disk(to("1.1.0"), &["1.0.0", "1.1.0"]),
        );
        assert_eq!(plan.journal_first, None);
        assert_eq!(plan.recovery.unwrap().reason, "unhealthy");
    }

    #[test]
    fn the_active_slot_is_never_removed() {
        // A journal no install writes (a version "replacing" itself).
        check(
            activating("1.0.0", Some("1.0.0")),
            disk(to("1.0.0"), &["1.0.0"]),
            Keep,
            &[],
            Some("1.0.0"),
            Report::Abandoned,
        );
    }

    /// `plan` carried out on the model, stopping after `steps` of its
    /// changes (journal first, link, removals, journal last): the journal
    /// and disk a crash there leaves.
    fn carry_out(journal: &Journal, disk: &Disk, plan: &Plan, steps: usize) -> (Journal, Disk) {
        let (mut journal, mut disk) = (journal.clone(), disk.clone());
        if steps >= 1
            && let Some(first) = &plan.journal_first
        {
            journal = first.clone();
        }
        if steps >= 2 {
            match &plan.link {
                Keep => {}
                Point(v) => disk.current = Link::To(v.clone()),
                Remove => disk.current = Link::Missing,
            }
        }
        if steps >= 3 {
            for v in &plan.remove {
                disk.slots.remove(v);
            }
        }
        if steps >= 4 {
            journal = plan.journal.clone();
        }
        (journal, disk)
    }

    #[test]
    fn recovery_is_consistent_and_survives_crashes_of_its_own() {
        let journals = [
            stable(None),
            stable(Some("1.0.0")),
            activating("1.1.0", None),
            activating("1.1.0", Some("1.0.0")),
            rolling_back("1.1.0", None),
            rolling_back("1.1.0", Some("1.0.0")),
        ];
        let currents = [
            Link::Missing,
            to("1.0.0"),
            to("1.1.0"),
            to("2.0.0"),
            Link::Broken("was not a symbolic link".into()),
        ];
        let slot_sets: [&[&str]; 4] = [&[], &["1.0.0"], &["1.1.0"], &["1.0.0", "1.1.0"]];
        for journal in &journals {
            for current in &currents {
                for slots in slot_sets {
                    let start = disk(current.clone(), slots);
                    let plan = decide("pos-app", journal, &start);
                    let Journal::Stable { active } = &plan.journal else {
                        panic!("{journal:?} {start:?} does not end stable");
                    };
                    let (_, end) = carry_out(journal, &start, &plan, 4);
                    // One whole version active, or none.
                    match active {
                        Some(v) => {
                            assert_eq!(end.current, Link::To(v.clone()));
                            assert!(end.slots.contains(v));
                        }
                        None => assert_eq!(end.current, Link::Missing),
                    }
                    // An unconfirmed version never stays active.
                    if let Journal::Activating { version, .. }
                    | Journal::RollingBack { version, .. } = journal
                    {
                        assert_ne!(active.as_ref(), Some(version), "{journal:?} {start:?}");
                    }
                    // A crash at any point of the recovery is recovered to
                    // the same end, and a finished recovery has nothing
                    // left to do.
                    for steps in 0..=4 {
                        let (journal, disk) = carry_out(journal, &start, &plan, steps);
                        let again = decide("pos-app", &journal, &disk);
                        assert_eq!(again.journal, plan.journal, "{journal:?} {disk:?}");
                        // Until the end is journaled, an interrupted install
                        // is reported the same way (a repaired link needs no
                        // report once repaired).
                        let repaired = plan.recovery.as_ref().map(|r| &r.action)
                            == Some(&RecoveryAction::Repaired);
                        if steps < 4 && !repaired {
                            assert_eq!(again.recovery, plan.recovery, "{journal:?} {disk:?}");
                        }
                        let (_, end_again) = carry_out(&journal, &disk, &again, 4);
                        assert_eq!(end_again, end, "{journal:?} {disk:?}");
                    }
                    let done = decide("pos-app", &plan.journal, &end);
                    assert_eq!(
                        (done.link, done.remove, done.recovery),
                        (Keep, vec![], None),
                        "{journal:?} {start:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_journal_format_is_tagged() {
        let json = serde_json::to_string(&activating("1.1.0", Some("1.0.0"))).unwrap();
        assert_eq!(
            json,
            r#"{"state":"activating","version":"1.1.0","previous":"1.0.0"}"#
        );
    }
}
