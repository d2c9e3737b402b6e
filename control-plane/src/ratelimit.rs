//! Per-peer rate limits for the calls anyone can make: `Enroll`, and calls
//! refused for a bad enrollment token or device credential. A peer is the
//! caller's IP address; IPv6 callers count per /64, since one host
//! usually holds a whole /64.
//!
//! Memory stays bounded however many addresses call: at most `max_peers`
//! peers are tracked. Once that many are, further peers share one budget
//! until `housekeeping` forgets the peers whose budget is full again.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::Status;

/// How often idle peers are forgotten.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);

/// Whom a budget belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6([u8; 8]),
    /// Every peer beyond `max_peers`, and callers whose address is unknown.
    Overflow,
}

impl Peer {
    pub fn of(addr: Option<IpAddr>) -> Peer {
        match addr.map(|a| a.to_canonical()) {
            Some(IpAddr::V4(v4)) => Peer::V4(v4.octets()),
            Some(IpAddr::V6(v6)) => {
                let mut prefix = [0; 8];
                prefix.copy_from_slice(&v6.octets()[..8]);
                Peer::V6(prefix)
            }
            None => Peer::Overflow,
        }
    }
}

/// A budget of calls per peer: `per_minute` sustained, `burst` at once.
pub struct PeerLimit {
    /// `None`: no limit.
    limiter: Option<DefaultKeyedRateLimiter<Peer>>,
    /// Peers over their budget, until when: read before work that a
    /// refused call must not reach (the budget counts failures, which are
    /// known only after that work).
    blocked: Mutex<HashMap<Peer, Instant>>,
    max_peers: usize,
    /// What is counted, for messages: "Enroll calls", "refused calls".
    what: &'static str,
}

impl PeerLimit {
    pub fn new(what: &'static str, per_minute: u32, burst: u32, max_peers: u32) -> PeerLimit {
        let limiter = NonZeroU32::new(per_minute).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            DefaultKeyedRateLimiter::keyed(Quota::per_minute(rate).allow_burst(burst))
        });
        PeerLimit {
            limiter,
            blocked: Mutex::new(HashMap::new()),
            max_peers: max_peers as usize,
            what,
        }
    }

    /// The budget `peer` draws from: its own, or the shared one when the
    /// table is full.
    fn key(&self, limiter: &DefaultKeyedRateLimiter<Peer>, peer: Peer) -> Peer {
        if limiter.len() >= self.max_peers {
            Peer::Overflow
        } else {
            peer
        }
    }

    /// Counts one call from `peer`; over its budget, the status to answer.
    pub fn charge(&self, peer: Peer) -> Result<(), Status> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let key = self.key(limiter, peer);
        match limiter.check_key(&key) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                self.block(key, wait);
                Err(self.exhausted(wait))
            }
        }
    }

    /// Refuses `peer` while it is over its budget, without counting a call.
    pub fn check(&self, peer: Peer) -> Result<(), Status> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let key = self.key(limiter, peer);
        let blocked = self
            .blocked
            .lock()
            // Poisoned only by a panic while holding it: the map is still a map.
            .unwrap_or_else(|e| e.into_inner());
        match blocked.get(&key) {
            Some(until) if *until > Instant::now() => {
                Err(self.exhausted(until.saturating_duration_since(Instant::now())))
            }
            _ => Ok(()),
        }
    }

    fn block(&self, key: Peer, wait: Duration) {
        let now = Instant::now();
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        if blocked.len() >= self.max_peers && !blocked.contains_key(&key) {
            blocked.retain(|_, until| *until > now);
            if blocked.len() >= self.max_peers {
                // Still full of live entries: the charge refused this call;
                // its next one is refused by `charge` again.
                return;
            }
        }
        blocked.insert(key, now + wait);
    }

    fn exhausted(&self, wait: Duration) -> Status {
        let seconds = wait.as_secs_f64().ceil().max(1.0);
        Status::resource_exhausted(format!(
            "too many {} from this address; retry in {seconds:.0}s",
            self.what
        ))
    }

    /// Forgets peers whose budget is full again and expired blocks.
    pub fn housekeeping(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        let now = Instant::now();
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        blocked.retain(|_, until| *until > now);
        blocked.shrink_to_fit();
    }

    /// Peers tracked now (their budgets and blocks).
    #[cfg(test)]
    pub fn tracked_peers(&self) -> usize {
        let budgets = self.limiter.as_ref().map_or(0, |l| l.len());
        let blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner()).len();
        budgets.max(blocked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use tonic::Code;

    fn v4(i: u32) -> Peer {
        Peer::of(Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))))
    }

    #[test]
    fn a_store_of_fifty_tills_enrolling_at_once_fits_the_default_burst() {
        let config = crate::config::Config::default();
        let limit = PeerLimit::new(
            "Enroll calls",
            config.peer_enroll_calls_per_minute,
            config.peer_enroll_burst_calls,
            config.rate_limit_max_peers,
        );
        for _ in 0..50 {
            limit.charge(v4(1)).unwrap();
        }
        // Their retries, too.
        for _ in 0..50 {
            limit.charge(v4(1)).unwrap();
        }
    }

    #[test]
    fn a_peer_over_its_budget_is_refused_with_resource_exhausted_and_others_are_not() {
        let limit = PeerLimit::new("refused calls", 60, 5, 1000);
        for _ in 0..5 {
            limit.check(v4(1)).unwrap();
            limit.charge(v4(1)).unwrap();
        }
        let refused = limit.charge(v4(1)).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(
            refused.message().contains("retry in"),
            "{}",
            refused.message()
        );
        // Now refused before any work, without a charge.
        assert_eq!(
            limit.check(v4(1)).unwrap_err().code(),
            Code::ResourceExhausted
        );
        limit.check(v4(2)).unwrap();
        limit.charge(v4(2)).unwrap();
    }

    #[test]
    fn a_flood_from_many_addresses_keeps_the_limiter_bounded() {
        let limit = PeerLimit::new("refused calls", 60, 2, 100);
        let mut refused = 0;
        for i in 0..20_000 {
            for _ in 0..3 {
                if limit.charge(v4(i)).is_err() {
                    refused += 1;
                }
            }
        }
        assert!(limit.tracked_peers() <= 101, "{}", limit.tracked_peers());
        // Past the table, the addresses share one budget: nearly all refused.
        assert!(refused > 50_000, "{refused}");
        // IPv6 counts per /64: a host's addresses share one budget.
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(Peer::of(Some(a.into())), Peer::of(Some(b.into())));
    }

    #[test]
    fn zero_per_minute_turns_the_limit_off() {
        let limit = PeerLimit::new("Enroll calls", 0, 1, 100);
        for _ in 0..10_000 {
            limit.charge(v4(1)).unwrap();
        }
        assert_eq!(limit.tracked_peers(), 0);
    }
}
