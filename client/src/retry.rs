//! Retries done carefully: exponential backoff with full jitter, a retry budget so an
//! outage cannot multiply load, and a circuit breaker per broker so a dead node is not
//! hammered.

use std::time::{Duration, Instant};

/// Exponential backoff with full jitter: attempt `n` waits a uniformly random time in
/// `[0, min(cap, base * 2^n))` (so clients that failed together do not retry together).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.base.saturating_mul(1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX)).min(self.cap);
        let nanos = ceiling.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(if nanos == 0 { 0 } else { fastrand::u64(0..nanos) })
    }
}

/// A token bucket of retries: each first attempt deposits `ratio` tokens (up to `max`),
/// each retry withdraws one. When it is empty, failures are returned instead of retried.
#[derive(Debug)]
pub struct RetryBudget {
    tokens: f64,
    ratio: f64,
    max: f64,
}

impl RetryBudget {
    /// Allows retries worth `ratio` of the request rate, with `max` retries saved up.
    pub fn new(ratio: f64, max: f64) -> RetryBudget {
        assert!(ratio >= 0.0 && max >= 1.0, "a retry budget needs a non-negative ratio and room for one retry");
        RetryBudget { tokens: max, ratio, max }
    }

    /// Records a first attempt.
    pub fn deposit(&mut self) {
        self.tokens = (self.tokens + self.ratio).min(self.max);
    }

    /// Takes a token for a retry; `false` means the budget is spent: do not retry.
    pub fn withdraw(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// State of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; consecutive failures are counted.
    Closed,
    /// Calls are refused without trying until the cool-down ends.
    Open,
    /// One trial call goes through; its outcome closes or re-opens the breaker.
    HalfOpen,
}

/// A circuit breaker for one broker.
#[derive(Debug)]
pub struct CircuitBreaker {
    state: BreakerState,
    failures: u32,
    threshold: u32,
    cool_down: Duration,
    opened_at: Option<Instant>,
    trial_in_flight: bool,
}

impl CircuitBreaker {
    /// Opens after `threshold` consecutive failures; tries again after `cool_down`.
    pub fn new(threshold: u32, cool_down: Duration) -> CircuitBreaker {
        assert!(threshold > 0, "a breaker that opens on zero failures never closes");
        CircuitBreaker { state: BreakerState::Closed, failures: 0, threshold, cool_down, opened_at: None, trial_in_flight: false }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a call may go out now (`now` is injected for tests).
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open => {
                if self.opened_at.is_some_and(|t| now.duration_since(t) >= self.cool_down) {
                    self.state = BreakerState::HalfOpen;
                    self.trial_in_flight = true;
                    true
                } else {
                    false
                }
            }
            BreakerState::HalfOpen => {
                if self.trial_in_flight {
                    false
                } else {
                    self.trial_in_flight = true;
                    true
                }
            }
        }
    }

    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed;
        self.failures = 0;
        self.opened_at = None;
        self.trial_in_flight = false;
    }

    pub fn on_failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        if self.state == BreakerState::HalfOpen || self.failures >= self.threshold {
            self.state = BreakerState::Open;
            self.opened_at = Some(now);
            self.trial_in_flight = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_delays_stay_below_the_growing_ceiling_and_the_cap() {
        let b = Backoff { base: Duration::from_millis(10), cap: Duration::from_millis(500) };
        for attempt in 0..40 {
            let ceiling = Duration::from_millis(10u64.saturating_mul(1 << attempt.min(20))).min(Duration::from_millis(500));
            for _ in 0..50 {
                assert!(b.delay(attempt) < ceiling.max(Duration::from_nanos(1)), "attempt {attempt}");
            }
        }
    }

    #[test]
    fn backoff_is_jittered_not_constant() {
        let b = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(10) };
        let delays: std::collections::HashSet<Duration> = (0..20).map(|_| b.delay(3)).collect();
        assert!(delays.len() > 10, "full jitter spreads retries: {delays:?}");
    }

    #[test]
    fn the_retry_budget_runs_dry_without_fresh_requests_and_refills_with_them() {
        let mut budget = RetryBudget::new(0.2, 3.0);
        assert!(budget.withdraw() && budget.withdraw() && budget.withdraw());
        assert!(!budget.withdraw(), "three saved retries, then none");
        for _ in 0..5 {
            budget.deposit();
        }
        assert!(budget.withdraw(), "five requests at 20% earn one retry");
        assert!(!budget.withdraw());
    }

    #[test]
    fn the_breaker_opens_after_consecutive_failures_then_half_opens_for_one_trial() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(3, Duration::from_secs(1));
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.state(), BreakerState::Closed);
        b.on_failure(t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow(t0 + Duration::from_millis(500)), "refused during the cool-down");
        assert!(b.allow(t0 + Duration::from_secs(1)), "one trial after the cool-down");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.allow(t0 + Duration::from_secs(1)), "only one trial at a time");
        b.on_failure(t0 + Duration::from_secs(1));
        assert_eq!(b.state(), BreakerState::Open, "a failed trial re-opens");
        assert!(b.allow(t0 + Duration::from_secs(2)));
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed, "a successful trial closes");
        assert!(b.allow(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(2, Duration::from_secs(1));
        b.on_failure(t0);
        b.on_success();
        b.on_failure(t0);
        assert_eq!(b.state(), BreakerState::Closed, "failures must be consecutive");
    }
}
