//! Exponential backoff with jitter, for every network loop.
//!
//! Each delay is drawn between half the exponential bound and the bound:
//! the jitter spreads a fleet of nodes that lost the control plane at the
//! same moment, and the floor keeps any of them from retrying hot.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff { base, cap, attempt: 0 }
    }

    /// The delay before the next attempt; each call doubles the bound.
    pub fn next_delay(&mut self) -> Duration {
        let bound = self.base.saturating_mul(1u32 << self.attempt.min(20)).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let millis = bound.as_millis() as u64;
        // Never zero: a hot loop is the one thing backoff must prevent.
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis.max(1)))
    }

    /// After a success: the next failure starts from the base again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..30 {
            assert!(backoff.next_delay() <= Duration::from_secs(60));
        }
        assert!(backoff.next_delay() >= Duration::from_secs(30), "capped, not reset");
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
