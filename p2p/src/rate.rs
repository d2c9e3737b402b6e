//! The per-peer upload cap: a token bucket that says how long to hold a
//! piece before sending it.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct TokenBucket {
    bytes_per_second: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A bucket refilled at `bytes_per_second` (> 0), holding at most
    /// `burst` bytes, full at `now`.
    pub fn new(bytes_per_second: u64, burst: u64, now: Instant) -> TokenBucket {
        TokenBucket {
            bytes_per_second: bytes_per_second.max(1) as f64,
            burst: burst as f64,
            tokens: burst as f64,
            at: now,
        }
    }

    /// Takes `bytes` from the bucket and returns how long the sender must
    /// wait before they fit the rate. The debt carries over, so successive
    /// reservations queue up behind each other.
    pub fn reserve(&mut self, bytes: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * self.bytes_per_second).min(self.burst);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.bytes_per_second)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(steps: &[(u64, u64, u64)]) {
        // (milliseconds after start, bytes, expected wait in milliseconds)
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, 1000, start);
        for &(at, bytes, wait) in steps {
            let got = bucket.reserve(bytes, start + Duration::from_millis(at));
            assert_eq!(got.as_millis() as u64, wait, "at {at} ms, {bytes} bytes");
        }
    }

    #[test]
    fn the_bucket_paces_to_its_rate_after_the_burst() {
        check(&[(0, 1000, 0), (0, 1000, 1000), (0, 500, 1500)]);
        check(&[(0, 1000, 0), (500, 500, 0), (500, 500, 500)]);
        // Idle time refills only up to the burst.
        check(&[(0, 1000, 0), (10_000, 1000, 0), (10_000, 1000, 1000)]);
    }
}
