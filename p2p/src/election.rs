//! Who in the store downloads a bundle from the origin: a pure state machine
//! over what this till sees of its peers, evaluated on every tick of the
//! swarm task. No I/O, no clock of its own: the caller passes `now`.
//!
//! The rule: among the connected members that announce they need the bundle,
//! plus this till, the one with the highest rendezvous score
//! `SHA-256(PeerId bytes || bundle digest)` fetches from the origin the
//! pieces no one in the store has. Everyone else pulls from it and from each
//! other. Every till computes the same order from the same announcements, so
//! without anyone coordinating, exactly one goes to the origin.
//!
//! - A till decides once every connected member has answered the
//!   announcement of its fetch (so what it knows of them is no older than
//!   its fetch), or `settle` after the fetch started, whichever comes first.
//!   Why that is enough: a member answering the announcement learns that
//!   this till fetches. If it had not started from the origin by then, it
//!   counts this till from then on and the two agree on the order; if it
//!   had, its answer says so and this till leaves it alone. Two tills thus
//!   both start only when one decided on the `settle` bound without an
//!   answer, and then the lower-ranked one stops as soon as it hears of the
//!   other. When the tills of a store hear of a bundle at different times
//!   (each with its own heartbeat), the first one finds no one fetching and
//!   starts at once; the later ones find it at work and leave it alone.
//! - A till already fetching from the origin and making progress is left
//!   alone, whatever its rank; if two fetch at once, the lower-ranked stops.
//! - A chosen till that does not start, or stops making progress, for
//!   `stall` is skipped and the next in order takes over, from the pieces the
//!   store has by then. A till whose own origin download stalls stops it and
//!   steps back.
//! - With no connected member for `fallback`, a till fetches alone.
//! - If the store has every piece but this till got none of them for
//!   `fallback + 2 × stall`, it fetches what it lacks from the origin too:
//!   a store never stalls for good.

use libp2p::PeerId;
use sha2::{Digest as _, Sha256};
use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::protocol::Digest;

/// The rendezvous score of `peer` for `bundle`; higher goes first.
pub(crate) fn score(peer: &PeerId, bundle: &Digest) -> [u8; 32] {
    Sha256::new()
        .chain_update(peer.to_bytes())
        .chain_update(bundle)
        .finalize()
        .into()
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub settle: Duration,
    pub fallback: Duration,
    pub stall: Duration,
}

/// A connected member that announced it needs the bundle.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub peer: PeerId,
    /// It announces that it is fetching from the origin.
    pub origin: bool,
    /// When its piece count last grew, or it started fetching from the origin.
    pub last_progress: Instant,
}

#[derive(Debug)]
pub(crate) struct Inputs<'a> {
    pub now: Instant,
    /// This till and its connected members hold every piece between them.
    pub store_complete: bool,
    /// Connected, usable members (whether or not they need the bundle).
    pub connected: usize,
    pub candidates: &'a [Candidate],
    /// False while a failed origin download waits before its retry.
    pub origin_allowed: bool,
    /// Every connected member answered an announcement this till sent
    /// after its fetch began.
    pub heard_all: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The pieces no one in the store has.
    Store,
    /// Every piece this till lacks: no peer connected.
    Alone,
    /// Every piece this till lacks: the store has them but this till cannot get them.
    Rescue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Wait,
    Start(Mode),
    Stop(StopReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// Every missing piece is now in the store.
    StoreComplete,
    /// No piece from the origin for `stall`.
    Stalled,
    /// A higher-ranked till is fetching from the origin too.
    HigherRankedFetcher,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::StoreComplete => "the store has every piece",
            StopReason::Stalled => "no progress from the origin",
            StopReason::HigherRankedFetcher => "a higher-ranked peer fetches from the origin",
        })
    }
}

#[derive(Debug)]
pub(crate) struct Election {
    local: PeerId,
    bundle: Digest,
    timing: Timing,
    started: Instant,
    alone_since: Option<Instant>,
    /// When this till last got a piece from anywhere.
    last_progress: Instant,
    /// Candidates skipped for not making progress (this till included).
    given_up: HashSet<PeerId>,
    /// The remote candidate this till waits for, and since when.
    waiting_for: Option<(PeerId, Instant)>,
    /// What the running origin download is for, and its last progress.
    running: Option<(Mode, Instant)>,
}

impl Election {
    pub fn new(local: PeerId, bundle: Digest, timing: Timing, now: Instant) -> Election {
        Election {
            local,
            bundle,
            timing,
            started: now,
            alone_since: None,
            last_progress: now,
            given_up: HashSet::new(),
            waiting_for: None,
            running: None,
        }
    }

    /// This till stored a piece (from anywhere).
    pub fn progressed(&mut self, now: Instant) {
        self.last_progress = now;
    }

    /// A piece arrived from this till's own origin download.
    pub fn origin_progressed(&mut self, now: Instant) {
        self.last_progress = now;
        if let Some((_, last)) = &mut self.running {
            *last = now;
        }
    }

    /// This till's origin download ended (done, failed or had nothing to fetch).
    pub fn origin_stopped(&mut self) {
        self.running = None;
    }

    pub fn decide(&mut self, i: &Inputs) -> Decision {
        let now = i.now;
        let stall = self.timing.stall;
        if i.connected == 0 {
            self.alone_since.get_or_insert(now);
        } else {
            self.alone_since = None;
        }
        let mine = score(&self.local, &self.bundle);
        let progressing = |c: &Candidate| c.origin && since(now, c.last_progress) <= stall;
        let higher_fetcher = i
            .candidates
            .iter()
            .any(|c| progressing(c) && score(&c.peer, &self.bundle) > mine);

        if let Some((mode, last)) = self.running {
            let stop = if since(now, last) > stall {
                self.given_up.insert(self.local);
                Some(StopReason::Stalled)
            } else if mode == Mode::Store && i.store_complete {
                Some(StopReason::StoreComplete)
            } else if mode == Mode::Alone && i.store_complete {
                // A peer that has it all turned up: pull from it instead.
                Some(StopReason::StoreComplete)
            } else if higher_fetcher {
                Some(StopReason::HigherRankedFetcher)
            } else {
                None
            };
            return match stop {
                Some(reason) => {
                    self.running = None;
                    Decision::Stop(reason)
                }
                None => Decision::Wait,
            };
        }
        if !i.origin_allowed {
            return Decision::Wait;
        }

        if i.store_complete {
            let patience = self.timing.fallback + 2 * stall;
            return if since(now, self.last_progress) > patience {
                self.start(Mode::Rescue, now)
            } else {
                Decision::Wait
            };
        }
        if i.connected == 0 {
            let alone_since = self.alone_since.unwrap_or(now);
            return if since(now, alone_since) >= self.timing.fallback {
                self.start(Mode::Alone, now)
            } else {
                Decision::Wait
            };
        }
        if !i.heard_all && since(now, self.started) < self.timing.settle {
            return Decision::Wait;
        }
        let mut order: Vec<([u8; 32], PeerId)> = i
            .candidates
            .iter()
            .map(|c| c.peer)
            .chain(std::iter::once(self.local))
            .filter(|p| !self.given_up.contains(p))
            .map(|p| (score(&p, &self.bundle), p))
            .collect();
        if order.is_empty() {
            // Every candidate failed once: start the round again.
            self.given_up.clear();
            return Decision::Wait;
        }
        order.sort_by_key(|(score, _)| std::cmp::Reverse(*score));
        let top = order[0].1;
        // How long the first in order has been first, counted even while
        // it works: if it stops (stalled, it steps back by itself) the next
        // one takes over one stall timeout after it started, not two.
        let waiting_since = match self.waiting_for {
            Some((peer, at)) if peer == top => at,
            _ => {
                self.waiting_for = Some((top, now));
                now
            }
        };
        if i.candidates.iter().any(progressing) {
            return Decision::Wait;
        }
        if top == self.local {
            self.waiting_for = None;
            return self.start(Mode::Store, now);
        }
        // An origin fetcher is judged by its pieces, anyone else by how
        // long it has been first without starting.
        let last_sign = i
            .candidates
            .iter()
            .find(|c| c.peer == top && c.origin)
            .map_or(waiting_since, |c| c.last_progress);
        if since(now, last_sign) > stall {
            self.given_up.insert(top);
            self.waiting_for = None;
        }
        Decision::Wait
    }

    fn start(&mut self, mode: Mode, now: Instant) -> Decision {
        self.running = Some((mode, now));
        Decision::Start(mode)
    }
}

fn since(now: Instant, then: Instant) -> Duration {
    now.saturating_duration_since(then)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUNDLE: Digest = [7; 32];

    fn timing() -> Timing {
        Timing {
            settle: Duration::from_secs(1),
            fallback: Duration::from_secs(10),
            stall: Duration::from_secs(5),
        }
    }

    /// `n` peers, highest rendezvous score first.
    fn ranked(n: usize) -> Vec<PeerId> {
        let mut peers: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
        peers.sort_by_key(|p| std::cmp::Reverse(score(p, &BUNDLE)));
        peers
    }

    fn wanting(peers: &[PeerId], at: Instant) -> Vec<Candidate> {
        peers
            .iter()
            .map(|&peer| Candidate {
                peer,
                origin: false,
                last_progress: at,
            })
            .collect()
    }

    struct Check {
        election: Election,
        t0: Instant,
    }

    impl Check {
        fn new(local: PeerId) -> Check {
            let t0 = Instant::now();
            Check {
                election: Election::new(local, BUNDLE, timing(), t0),
                t0,
            }
        }

        /// Decides at `ms` after the start.
        fn at(&mut self, ms: u64, store_complete: bool, candidates: &[Candidate]) -> Decision {
            self.election.decide(&Inputs {
                now: self.t0 + Duration::from_millis(ms),
                store_complete,
                connected: candidates.len(),
                candidates,
                origin_allowed: true,
                heard_all: false,
            })
        }
    }

    /// What one of two tills sees of the other: nothing yet, its fetch, or
    /// its origin download (with the last sign of progress, in ms).
    #[derive(Clone, Copy)]
    enum Other {
        Unknown,
        Fetching,
        Origin { progress_ms: u64 },
    }

    struct Row {
        what: &'static str,
        /// This till is the higher-ranked of the two.
        higher: bool,
        /// This till already fetches from the origin (started at 0 ms).
        running: bool,
        other: Other,
        heard_all: bool,
        at_ms: u64,
        expect: Decision,
    }

    /// Two tills of one store starting the same fetch at nearly the same
    /// time, each seen from one side.
    #[test]
    fn two_tills_starting_together_never_both_keep_fetching_from_the_origin() {
        use Other::*;
        let store = Decision::Start(Mode::Store);
        let rows = [
            Row {
                what: "the other answered: not fetching; no need to wait for the settle delay",
                higher: false,
                running: false,
                other: Unknown,
                heard_all: true,
                at_ms: 10,
                expect: store,
            },
            Row {
                what: "not every member answered yet",
                higher: true,
                running: false,
                other: Unknown,
                heard_all: false,
                at_ms: 10,
                expect: Decision::Wait,
            },
            Row {
                what: "no answer by the settle delay: go on what is known",
                higher: false,
                running: false,
                other: Unknown,
                heard_all: false,
                at_ms: 1000,
                expect: store,
            },
            Row {
                what: "both fetching, both heard: the higher-ranked goes",
                higher: true,
                running: false,
                other: Fetching,
                heard_all: true,
                at_ms: 10,
                expect: store,
            },
            Row {
                what: "both fetching, both heard: the lower-ranked waits",
                higher: false,
                running: false,
                other: Fetching,
                heard_all: true,
                at_ms: 10,
                expect: Decision::Wait,
            },
            Row {
                what: "the lower-ranked one started before hearing of this till: left alone",
                higher: true,
                running: false,
                other: Origin { progress_ms: 5 },
                heard_all: true,
                at_ms: 10,
                expect: Decision::Wait,
            },
            Row {
                what: "a lower-ranked origin download does not stop this one",
                higher: true,
                running: true,
                other: Origin { progress_ms: 5 },
                heard_all: true,
                at_ms: 10,
                expect: Decision::Wait,
            },
            Row {
                what: "this lower-ranked one hears of the higher-ranked download late: stops",
                higher: false,
                running: true,
                other: Origin { progress_ms: 900 },
                heard_all: false,
                at_ms: 1000,
                expect: Decision::Stop(StopReason::HigherRankedFetcher),
            },
        ];
        let peers = ranked(2);
        for row in rows {
            let (me, other) = if row.higher {
                (peers[0], peers[1])
            } else {
                (peers[1], peers[0])
            };
            let mut check = Check::new(me);
            let t0 = check.t0;
            if row.running {
                check.election.start(Mode::Store, t0);
                check
                    .election
                    .origin_progressed(t0 + Duration::from_millis(row.at_ms));
            }
            let candidates: Vec<Candidate> = match row.other {
                Unknown => Vec::new(),
                Fetching => wanting(&[other], t0),
                Origin { progress_ms } => vec![Candidate {
                    peer: other,
                    origin: true,
                    last_progress: t0 + Duration::from_millis(progress_ms),
                }],
            };
            let got = check.election.decide(&Inputs {
                now: t0 + Duration::from_millis(row.at_ms),
                store_complete: false,
                connected: 1,
                candidates: &candidates,
                origin_allowed: true,
                heard_all: row.heard_all,
            });
            assert_eq!(got, row.expect, "{}", row.what);
        }
    }

    #[test]
    fn the_highest_ranked_till_fetches_once_the_announcements_settle() {
        let peers = ranked(4);
        // The top-ranked till, seeing the other three.
        let mut top = Check::new(peers[0]);
        let others = wanting(&peers[1..], top.t0);
        assert_eq!(top.at(500, false, &others), Decision::Wait, "settling");
        assert_eq!(top.at(1000, false, &others), Decision::Start(Mode::Store));
        assert_eq!(top.at(1100, false, &others), Decision::Wait, "keeps going");
        top.election
            .origin_progressed(top.t0 + Duration::from_millis(1100));
        // Everyone else waits for it.
        for &me in &peers[1..] {
            let mut check = Check::new(me);
            let seen: Vec<PeerId> = peers.iter().copied().filter(|&p| p != me).collect();
            let cands = wanting(&seen, check.t0);
            assert_eq!(check.at(1000, false, &cands), Decision::Wait);
            assert_eq!(check.at(3000, false, &cands), Decision::Wait);
        }
    }

    #[test]
    fn the_next_in_order_takes_over_when_the_chosen_one_never_starts() {
        let peers = ranked(3);
        let mut second = Check::new(peers[1]);
        let cands = wanting(&[peers[0], peers[2]], second.t0);
        assert_eq!(second.at(1000, false, &cands), Decision::Wait);
        assert_eq!(
            second.at(6000, false, &cands),
            Decision::Wait,
            "stall is 5 s"
        );
        assert_eq!(
            second.at(6001, false, &cands),
            Decision::Wait,
            "gives up on it"
        );
        assert_eq!(second.at(6002, false, &cands), Decision::Start(Mode::Store));
    }

    #[test]
    fn a_stalled_origin_fetcher_is_replaced_and_a_working_one_is_left_alone() {
        let peers = ranked(2);
        let mut second = Check::new(peers[1]);
        let t0 = second.t0;
        let t = |ms| t0 + Duration::from_millis(ms);
        let mut fetcher = wanting(&[peers[0]], t(0));
        fetcher[0].origin = true;
        fetcher[0].last_progress = t(2000);
        assert_eq!(second.at(4000, false, &fetcher), Decision::Wait);
        fetcher[0].last_progress = t(6000);
        assert_eq!(
            second.at(10_000, false, &fetcher),
            Decision::Wait,
            "progressing"
        );
        // No piece for more than 5 s: skipped, and this till takes over.
        assert_eq!(second.at(11_001, false, &fetcher), Decision::Wait);
        assert_eq!(
            second.at(11_002, false, &fetcher),
            Decision::Start(Mode::Store)
        );
        second.election.origin_progressed(t(11_500));
        // The old one recovers and ranks higher: this till stops at once.
        fetcher[0].last_progress = t(11_600);
        assert_eq!(
            second.at(11_700, false, &fetcher),
            Decision::Stop(StopReason::HigherRankedFetcher)
        );
        assert_eq!(second.at(11_800, false, &fetcher), Decision::Wait);
    }

    #[test]
    fn a_fetcher_that_steps_back_by_itself_is_replaced_one_stall_after_it_started() {
        let peers = ranked(2);
        let mut second = Check::new(peers[1]);
        let t0 = second.t0;
        let mut top = wanting(&[peers[0]], t0);
        top[0].origin = true;
        top[0].last_progress = t0 + Duration::from_millis(1000);
        assert_eq!(second.at(1000, false, &top), Decision::Wait);
        // Its origin never sent a piece; it stops and says so.
        top[0].origin = false;
        assert_eq!(second.at(5500, false, &top), Decision::Wait);
        assert_eq!(
            second.at(6001, false, &top),
            Decision::Wait,
            "gives up on it"
        );
        assert_eq!(second.at(6002, false, &top), Decision::Start(Mode::Store));
    }

    #[test]
    fn a_lower_ranked_fetcher_does_not_stop_a_higher_one() {
        let peers = ranked(2);
        let mut top = Check::new(peers[0]);
        let mut lower = wanting(&[peers[1]], top.t0);
        assert_eq!(top.at(1000, false, &lower), Decision::Start(Mode::Store));
        lower[0].origin = true;
        lower[0].last_progress = top.t0 + Duration::from_millis(1200);
        top.election
            .origin_progressed(top.t0 + Duration::from_millis(1200));
        assert_eq!(top.at(1300, false, &lower), Decision::Wait);
    }

    #[test]
    fn a_till_whose_origin_download_stalls_steps_back() {
        let peers = ranked(2);
        let mut top = Check::new(peers[0]);
        let cands = wanting(&[peers[1]], top.t0);
        assert_eq!(top.at(1000, false, &cands), Decision::Start(Mode::Store));
        assert_eq!(
            top.at(6001, false, &cands),
            Decision::Stop(StopReason::Stalled)
        );
        // It now waits for the next one instead of starting again.
        assert_eq!(top.at(6100, false, &cands), Decision::Wait);
    }

    #[test]
    fn a_till_alone_waits_for_the_fallback_delay() {
        let mut alone = Check::new(PeerId::random());
        assert_eq!(alone.at(0, false, &[]), Decision::Wait);
        assert_eq!(alone.at(9_999, false, &[]), Decision::Wait);
        assert_eq!(alone.at(10_000, false, &[]), Decision::Start(Mode::Alone));
        // Then a peer with every piece shows up: pull from it instead.
        let peer = wanting(&[PeerId::random()], alone.t0);
        alone
            .election
            .origin_progressed(alone.t0 + Duration::from_millis(10_500));
        assert_eq!(
            alone.at(10_600, true, &peer),
            Decision::Stop(StopReason::StoreComplete)
        );
    }

    #[test]
    fn the_store_having_everything_means_no_origin_unless_nothing_arrives() {
        let peer = vec![Candidate {
            peer: PeerId::random(),
            origin: false,
            last_progress: Instant::now(),
        }];
        let mut check = Check::new(PeerId::random());
        assert_eq!(check.at(5000, true, &peer), Decision::Wait);
        check
            .election
            .progressed(check.t0 + Duration::from_millis(5000));
        assert_eq!(check.at(25_000, true, &peer), Decision::Wait);
        assert_eq!(check.at(25_001, true, &peer), Decision::Start(Mode::Rescue));
    }
}
