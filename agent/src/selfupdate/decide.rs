//! The launcher's decision: from the self-update journal, what is on disk
//! and what the launcher saw of the agent on trial, which agent runs and
//! what to change first so that it is the one `current` names. A pure
//! function ([`decide`]): reading the disk and carrying the plan out are
//! `root.rs`'s, so a kill while the plan is carried out leads to the same
//! plan again.

use semver::Version;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

pub(crate) use crate::install::{Link, LinkChange};

/// Exits of an agent on trial, before it confirmed itself, after which it
/// is reverted without waiting for its deadline.
pub const MAX_TRIAL_EXITS: u32 = 3;

/// The self-update journal (`agent/journal.json`). No journal: the agent
/// never updated itself; `current`, if any, is what runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Journal {
    /// `to` is whole in `versions/` and `current` is being (or was)
    /// switched to it from `from` (`None`: the factory agent). It runs on
    /// trial until it confirms itself, at the latest by `deadline_ms`
    /// (Unix ms, wall clock).
    Trying {
        from: Option<Version>,
        to: Version,
        started_at_ms: i64,
        deadline_ms: i64,
    },
    /// `version` reached the control plane and reported healthy; `previous`
    /// is kept to go back to.
    Confirmed {
        version: Version,
        previous: Option<Version>,
    },
    /// `to` did not confirm itself: `current` goes (went) back to `from`.
    /// The agent that runs then reports it and never tries `to` again.
    Reverted {
        from: Option<Version>,
        to: Version,
        reason: String,
        at_ms: i64,
    },
}

/// What there is on disk (temporary entries aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Disk {
    pub(crate) current: Link,
    /// Versions whose folder is whole and holds the agent's executable.
    pub(crate) versions: BTreeSet<Version>,
}

/// The agent to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Run {
    /// The one the package installed (no `current`).
    Factory,
    Version(Version),
}

/// The changes to make, in order, then the agent to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Written before anything else.
    pub(crate) journal: Option<Journal>,
    pub(crate) link: LinkChange,
    /// Version folders to remove; never the one that runs.
    pub(crate) remove: Vec<Version>,
    pub(crate) run: Run,
    /// Set when this plan reverts the agent on trial: its version and why.
    pub(crate) reverted: Option<(Version, String)>,
}

/// Which agent runs and what to change first, from the journal, the disk,
/// the wall clock (`now_ms`) and how many times the agent on trial exited
/// before confirming itself (`trial_exits`, counted by this launcher).
pub(crate) fn decide(
    journal: Option<&Journal>,
    disk: &Disk,
    now_ms: i64,
    trial_exits: u32,
) -> Plan {
    // Runs `target` if its folder is whole, else the factory agent.
    let settle = |target: Option<&Version>| match target {
        Some(v) if disk.versions.contains(v) => {
            let link = if disk.current == Link::To(v.clone()) {
                LinkChange::Keep
            } else {
                LinkChange::Point(v.clone())
            };
            (link, Run::Version(v.clone()))
        }
        _ => {
            let link = if disk.current == Link::Missing {
                LinkChange::Keep
            } else {
                LinkChange::Remove
            };
            (link, Run::Factory)
        }
    };
    let plan = |journal: Option<Journal>,
                (link, run): (LinkChange, Run),
                remove: Option<&Version>,
                reverted: Option<(Version, String)>| {
        let remove = remove
            .filter(|v| disk.versions.contains(v) && run != Run::Version((*v).clone()))
            .cloned()
            .into_iter()
            .collect();
        Plan {
            journal,
            link,
            remove,
            run,
            reverted,
        }
    };
    match journal {
        None => match &disk.current {
            Link::To(v) if disk.versions.contains(v) => plan(None, settle(Some(v)), None, None),
            _ => plan(None, settle(None), None, None),
        },
        Some(Journal::Confirmed { version, previous }) => {
            let target = if disk.versions.contains(version) {
                Some(version)
            } else {
                previous.as_ref()
            };
            plan(None, settle(target), None, None)
        }
        Some(Journal::Reverted { from, to, .. }) => {
            plan(None, settle(from.as_ref()), Some(to), None)
        }
        Some(Journal::Trying {
            from,
            to,
            started_at_ms,
            deadline_ms,
        }) => {
            let reason = if !disk.versions.contains(to) {
                Some(format!("agent {to} is not whole on disk"))
            } else if now_ms >= *deadline_ms {
                Some(format!(
                    "agent {to} did not reach the control plane and report healthy within {} s",
                    (deadline_ms - started_at_ms).max(0) / 1000
                ))
            } else if trial_exits >= MAX_TRIAL_EXITS {
                Some(format!(
                    "agent {to} exited {trial_exits} times before it confirmed itself"
                ))
            } else {
                None
            };
            match reason {
                None => plan(None, settle(Some(to)), None, None),
                Some(reason) => plan(
                    Some(Journal::Reverted {
                        from: from.clone(),
                        to: to.clone(),
                        reason: reason.clone(),
                        at_ms: now_ms,
                    }),
                    settle(from.as_ref()),
                    Some(to),
                    Some((to.clone(), reason)),
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        Version::parse(text).unwrap()
    }

    fn disk(current: Link, versions: &[&str]) -> Disk {
        Disk {
            current,
            versions: versions.iter().map(|s| v(s)).collect(),
        }
    }

    fn to(text: &str) -> Link {
        Link::To(v(text))
    }

    fn trying(from: Option<&str>, version: &str) -> Journal {
        Journal::Trying {
            from: from.map(v),
            to: v(version),
            started_at_ms: 1_000,
            deadline_ms: 301_000,
        }
    }

    fn confirmed(version: &str, previous: Option<&str>) -> Journal {
        Journal::Confirmed {
            version: v(version),
            previous: previous.map(v),
        }
    }

    fn reverted(from: Option<&str>, version: &str) -> Journal {
        Journal::Reverted {
            from: from.map(v),
            to: v(version),
            reason: "not confirmed".into(),
            at_ms: 400_000,
        }
    }

    fn run(version: Option<&str>) -> Run {
        version.map_or(Run::Factory, |s| Run::Version(v(s)))
    }

    /// Checks the link change, the folders removed, the agent run and
    /// whether the plan reverts.
    #[track_caller]
    fn check(
        journal: Option<Journal>,
        disk: Disk,
        (now_ms, exits): (i64, u32),
        link: LinkChange,
        removed: &[&str],
        runs: Option<&str>,
        reverts: bool,
    ) {
        let plan = decide(journal.as_ref(), &disk, now_ms, exits);
        let what = format!("{journal:?} {disk:?} at {now_ms} after {exits} exits");
        assert_eq!(plan.link, link, "link for {what}");
        let removed: Vec<Version> = removed.iter().map(|s| v(s)).collect();
        assert_eq!(plan.remove, removed, "removed for {what}");
        assert_eq!(plan.run, run(runs), "run for {what}");
        assert_eq!(plan.reverted.is_some(), reverts, "revert for {what}");
        assert_eq!(
            plan.journal.is_some(),
            reverts,
            "a journal is written exactly when reverting: {what}"
        );
    }

    const CALM: (i64, u32) = (2_000, 0);
    use LinkChange::{Keep, Point, Remove};

    #[test]
    fn without_a_journal_current_or_the_factory_agent_runs() {
        check(None, disk(Link::Missing, &[]), CALM, Keep, &[], None, false);
        check(
            None,
            disk(to("1.0.0"), &["1.0.0"]),
            CALM,
            Keep,
            &[],
            Some("1.0.0"),
            false,
        );
        // A link to nothing runnable: removed, never followed.
        for current in [to("1.0.0"), Link::Broken("was a file".into())] {
            check(None, disk(current, &[]), CALM, Remove, &[], None, false);
        }
    }

    #[test]
    fn an_agent_on_trial_runs_until_its_deadline_or_its_third_exit() {
        // Journaled, not switched yet: switched now.
        check(
            Some(trying(Some("1.0.0"), "1.1.0")),
            disk(to("1.0.0"), &["1.0.0", "1.1.0"]),
            CALM,
            Point(v("1.1.0")),
            &[],
            Some("1.1.0"),
            false,
        );
        check(
            Some(trying(None, "1.1.0")),
            disk(to("1.1.0"), &["1.1.0"]),
            (300_999, MAX_TRIAL_EXITS - 1),
            Keep,
            &[],
            Some("1.1.0"),
            false,
        );
        // The deadline passed: back to the one before.
        check(
            Some(trying(Some("1.0.0"), "1.1.0")),
            disk(to("1.1.0"), &["1.0.0", "1.1.0"]),
            (301_000, 0),
            Point(v("1.0.0")),
            &["1.1.0"],
            Some("1.0.0"),
            true,
        );
        // Exited too often: back to the factory agent.
        check(
            Some(trying(None, "1.1.0")),
            disk(to("1.1.0"), &["1.1.0"]),
            (2_000, MAX_TRIAL_EXITS),
            Remove,
            &["1.1.0"],
            None,
            true,
        );
        // Not whole: nothing to try.
        check(
            Some(trying(Some("1.0.0"), "1.1.0")),
            disk(to("1.0.0"), &["1.0.0"]),
            CALM,
            Keep,
            &[],
            Some("1.0.0"),
            true,
        );
        // The one to go back to is gone too: the factory agent.
        check(
            Some(trying(Some("1.0.0"), "1.1.0")),
            disk(to("1.1.0"), &["1.1.0"]),
            (400_000, 0),
            Remove,
            &["1.1.0"],
            None,
            true,
        );
        let plan = decide(
            Some(&trying(Some("1.0.0"), "1.1.0")),
            &disk(to("1.1.0"), &["1.0.0", "1.1.0"]),
            301_000,
            0,
        );
        let reason = "agent 1.1.0 did not reach the control plane and report healthy within 300 s";
        assert_eq!(plan.reverted, Some((v("1.1.0"), reason.to_string())));
        assert_eq!(
            plan.journal,
            Some(Journal::Reverted {
                from: Some(v("1.0.0")),
                to: v("1.1.0"),
                reason: reason.into(),
                at_ms: 301_000,
            })
        );
    }

    #[test]
    fn a_confirmed_agent_runs_and_a_reverted_one_never_again() {
        check(
            Some(confirmed("1.1.0", Some("1.0.0"))),
            disk(to("1.1.0"), &["1.0.0", "1.1.0"]),
            CALM,
            Keep,
            &[],
            Some("1.1.0"),
            false,
        );
        // Killed between the switch and the journal of a revert, or a link
        // damaged: the journal says which.
        check(
            Some(confirmed("1.1.0", Some("1.0.0"))),
            disk(Link::Broken("was a file".into()), &["1.0.0", "1.1.0"]),
            CALM,
            Point(v("1.1.0")),
            &[],
            Some("1.1.0"),
            false,
        );
        check(
            Some(confirmed("1.1.0", Some("1.0.0"))),
            disk(to("1.1.0"), &["1.0.0"]),
            CALM,
            Point(v("1.0.0")),
            &[],
            Some("1.0.0"),
            false,
        );
        check(
            Some(reverted(Some("1.0.0"), "1.1.0")),
            disk(to("1.1.0"), &["1.0.0", "1.1.0"]),
            CALM,
            Point(v("1.0.0")),
            &["1.1.0"],
            Some("1.0.0"),
            false,
        );
        check(
            Some(reverted(None, "1.1.0")),
            disk(Link::Missing, &[]),
            CALM,
            Keep,
            &[],
            None,
            false,
        );
        // A later install of another version beside a reverted one is left
        // alone until it is journaled.
        check(
            Some(reverted(Some("1.0.0"), "1.1.0")),
            disk(to("1.0.0"), &["1.0.0", "1.2.0"]),
            CALM,
            Keep,
            &[],
            Some("1.0.0"),
            false,
        );
    }

    /// `plan` carried out on the model, stopping after `steps` of its
    /// changes (journal, link, removals): what a kill there leaves.
    fn carry_out(
        journal: Option<&Journal>,
        disk: &Disk,
        plan: &Plan,
        steps: usize,
    ) -> (Option<Journal>, Disk) {
        let (mut journal, mut disk) = (journal.cloned(), disk.clone());
        if steps >= 1
            && let Some(first) = &plan.journal
        {
            journal = Some(first.clone());
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
                disk.versions.remove(v);
            }
        }
        (journal, disk)
    }

    #[test]
    fn every_state_runs_exactly_one_whole_agent_and_survives_kills_of_its_own() {
        let journals = [
            None,
            Some(trying(None, "1.1.0")),
            Some(trying(Some("1.0.0"), "1.1.0")),
            Some(confirmed("1.1.0", None)),
            Some(confirmed("1.1.0", Some("1.0.0"))),
            Some(reverted(None, "1.1.0")),
            Some(reverted(Some("1.0.0"), "1.1.0")),
        ];
        let currents = [
            Link::Missing,
            to("1.0.0"),
            to("1.1.0"),
            to("2.0.0"),
            Link::Broken("was not a symbolic link".into()),
        ];
        let version_sets: [&[&str]; 4] = [&[], &["1.0.0"], &["1.1.0"], &["1.0.0", "1.1.0"]];
        let moments = [CALM, (301_000, 0), (2_000, MAX_TRIAL_EXITS)];
        for journal in &journals {
            for current in &currents {
                for versions in version_sets {
                    for (now_ms, exits) in moments {
                        let start = disk(current.clone(), versions);
                        let plan = decide(journal.as_ref(), &start, now_ms, exits);
                        let what = format!("{journal:?} {start:?} at {now_ms} after {exits}");
                        let (end_journal, end) = carry_out(journal.as_ref(), &start, &plan, 3);
                        // Exactly one agent runs, and `current` names it (or
                        // is absent for the factory agent), whole.
                        match &plan.run {
                            Run::Version(v) => {
                                assert_eq!(end.current, Link::To(v.clone()), "{what}");
                                assert!(end.versions.contains(v), "{what}");
                            }
                            Run::Factory => assert_eq!(end.current, Link::Missing, "{what}"),
                        }
                        // A reverted version never runs again.
                        if let Some(Journal::Reverted { to, .. }) = &end_journal {
                            assert_ne!(plan.run, Run::Version(to.clone()), "{what}");
                            assert!(!end.versions.contains(to), "{what}");
                        }
                        // A kill at any step of the plan, and a new launcher
                        // (which has seen no exits), ends the same way.
                        for steps in 0..=3 {
                            let (j, d) = carry_out(journal.as_ref(), &start, &plan, steps);
                            let exits = if steps >= 1 && plan.journal.is_some() {
                                0
                            } else {
                                exits
                            };
                            let again = decide(j.as_ref(), &d, now_ms, exits);
                            assert_eq!(again.run, plan.run, "{what} after {steps} steps");
                            let (j2, d2) = carry_out(j.as_ref(), &d, &again, 3);
                            assert_eq!((j2, d2), (end_journal.clone(), end.clone()), "{what}");
                        }
                        // Done: nothing more to change.
                        let done = decide(end_journal.as_ref(), &end, now_ms, 0);
                        assert_eq!(
                            (done.link, done.remove, done.journal, done.run),
                            (Keep, vec![], None, plan.run.clone()),
                            "{what}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_journal_format_is_tagged() {
        let json = serde_json::to_string(&trying(Some("1.0.0"), "1.1.0")).unwrap();
        assert_eq!(
            json,
            r#"{"state":"trying","from":"1.0.0","to":"1.1.0","started_at_ms":1000,"deadline_ms":301000}"#
        );
    }
}
