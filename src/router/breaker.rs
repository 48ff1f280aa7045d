//! A circuit breaker per host: after repeated failures, stop sending to it for a while, then let
//! one probe request through; its success closes the breaker, its failure opens it again.
//! Uses tokio's clock so tests run with time paused.

use tokio::time::{Duration, Instant};

/// Consecutive failures that open the breaker.
pub const FAILURE_THRESHOLD: u32 = 3;
/// How long an open breaker refuses before it allows a probe.
pub const OPEN_FOR: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open {
        until: Instant,
    },
    /// A probe is out; nothing else goes until it reports (or, should it never report, until
    /// another cooldown has passed).
    HalfOpen {
        since: Instant,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct Breaker {
    state: BreakerState,
    consecutive_failures: u32,
}

impl Default for Breaker {
    fn default() -> Self {
        Self { state: BreakerState::Closed, consecutive_failures: 0 }
    }
}

impl Breaker {
    /// Whether a request may go to this host now. Turns an expired open breaker half-open and
    /// counts the caller as its probe.
    pub fn allow(&mut self, now: Instant) -> bool {
        if !self.available(now) {
            return false;
        }
        if self.state != BreakerState::Closed {
            self.state = BreakerState::HalfOpen { since: now };
        }
        true
    }

    /// Whether `allow` would let a request through, without changing anything.
    pub fn available(&self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { until } => now >= until,
            BreakerState::HalfOpen { since } => now >= since + OPEN_FOR,
        }
    }

    pub fn succeeded(&mut self) {
        self.state = BreakerState::Closed;
        self.consecutive_failures = 0;
    }

    pub fn failed(&mut self, now: Instant) {
        self.consecutive_failures += 1;
        if matches!(self.state, BreakerState::HalfOpen { .. })
            || self.consecutive_failures >= FAILURE_THRESHOLD
        {
            self.state = BreakerState::Open { until: now + OPEN_FOR };
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether the breaker keeps requests away (for health reports).
    pub fn is_open(&self) -> bool {
        !matches!(self.state, BreakerState::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_repeated_failures_and_probes_after_the_cooldown() {
        let mut breaker = Breaker::default();
        for _ in 0..FAILURE_THRESHOLD - 1 {
            breaker.failed(Instant::now());
            assert!(breaker.allow(Instant::now()), "still closed below the threshold");
        }
        breaker.failed(Instant::now());
        assert!(!breaker.allow(Instant::now()));
        tokio::time::advance(OPEN_FOR - Duration::from_millis(1)).await;
        assert!(!breaker.allow(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(breaker.allow(Instant::now()), "one probe after the cooldown");
        assert!(!breaker.allow(Instant::now()), "only one probe at a time");
        breaker.succeeded();
        assert!(breaker.allow(Instant::now()));
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again() {
        let mut breaker = Breaker::default();
        for _ in 0..FAILURE_THRESHOLD {
            breaker.failed(Instant::now());
        }
        tokio::time::advance(OPEN_FOR).await;
        assert!(breaker.allow(Instant::now()));
        breaker.failed(Instant::now());
        assert!(!breaker.allow(Instant::now()));
        assert!(matches!(breaker.state(), BreakerState::Open { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let mut breaker = Breaker::default();
        breaker.failed(Instant::now());
        breaker.failed(Instant::now());
        breaker.succeeded();
        breaker.failed(Instant::now());
        breaker.failed(Instant::now());
        assert!(breaker.allow(Instant::now()));
    }
}
