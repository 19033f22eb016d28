//! A broker's circuit breaker. Pure: the caller passes `now`; every state change comes back as a
//! `Transition` for the caller to log (one line per change, docs/design.md 7).
//!
//! closed ──(failure_threshold consecutive retryable failures, or failure ratio over the window
//!          above failure_ratio with at least min_requests)──► open
//! open ──(open duration passed; it doubles on each trip, capped at max_open)──► half-open
//! half-open ──(half_open_probes requests let through; a success)──► closed
//! half-open ──(a probe fails)──► open

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub failure_ratio: f64,
    pub min_requests: u32,
    pub window: Duration,
    pub open: Duration,
    pub max_open: Duration,
    pub half_open_probes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open { until: Instant },
    HalfOpen { probes_sent: u32 },
}

impl BreakerState {
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }
}

/// One state change, with what the log line needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: &'static str,
    pub to: &'static str,
    pub reason: String,
    pub consecutive_failures: u32,
    pub open_until: Option<Instant>,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: BreakerState,
    since: Instant,
    consecutive_failures: u32,
    /// Outcomes inside the rolling window: (when, failed).
    recent: VecDeque<(Instant, bool)>,
    /// Trips since the breaker was last closed by a success; grows the open time.
    trips: u32,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig, now: Instant) -> Self {
        CircuitBreaker {
            config,
            state: BreakerState::Closed,
            since: now,
            consecutive_failures: 0,
            recent: VecDeque::new(),
            trips: 0,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn since(&self) -> Instant {
        self.since
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// May a request start now? Counts half-open probes; moves open to half-open when due.
    pub fn try_acquire(&mut self, now: Instant) -> (bool, Option<Transition>) {
        match self.state {
            BreakerState::Closed => (true, None),
            BreakerState::Open { until } if now < until => (false, None),
            BreakerState::Open { .. } => {
                let transition = self.change(
                    BreakerState::HalfOpen { probes_sent: 1 },
                    now,
                    "open period over; probing".into(),
                );
                (true, Some(transition))
            }
            BreakerState::HalfOpen { probes_sent } => {
                if probes_sent < self.config.half_open_probes {
                    self.state = BreakerState::HalfOpen {
                        probes_sent: probes_sent + 1,
                    };
                    (true, None)
                } else {
                    (false, None)
                }
            }
        }
    }

    /// When a closed-again breaker would next let a request through, if it is open.
    pub fn open_until(&self) -> Option<Instant> {
        match self.state {
            BreakerState::Open { until } => Some(until),
            _ => None,
        }
    }

    /// The endpoint answered in a way that shows it is up (2xx, or a permanent 4xx).
    pub fn on_success(&mut self, now: Instant) -> Option<Transition> {
        self.consecutive_failures = 0;
        self.remember(now, false);
        match self.state {
            BreakerState::HalfOpen { .. } => {
                self.trips = 0;
                Some(self.change(BreakerState::Closed, now, "probe succeeded".into()))
            }
            _ => None,
        }
    }

    /// A retryable failure: timeout, connection error, 408/425/429/5xx.
    pub fn on_failure(&mut self, now: Instant) -> Option<Transition> {
        self.consecutive_failures += 1;
        self.remember(now, true);
        match self.state {
            BreakerState::HalfOpen { .. } => Some(self.trip(now, "probe failed".into())),
            BreakerState::Closed => {
                if self.consecutive_failures >= self.config.failure_threshold {
                    let reason = format!("{} consecutive failures", self.consecutive_failures);
                    return Some(self.trip(now, reason));
                }
                let total = self.recent.len() as u32;
                let failed = self.recent.iter().filter(|(_, failed)| *failed).count() as u32;
                if total >= self.config.min_requests
                    && f64::from(failed) / f64::from(total) > self.config.failure_ratio
                {
                    let reason = format!("{failed} of the last {total} requests failed");
                    return Some(self.trip(now, reason));
                }
                None
            }
            // Late answers to requests started before the trip change nothing.
            BreakerState::Open { .. } => None,
        }
    }

    fn trip(&mut self, now: Instant, reason: String) -> Transition {
        self.trips += 1;
        let factor = 1u32 << (self.trips - 1).min(16);
        let open_for = self
            .config
            .open
            .saturating_mul(factor)
            .min(self.config.max_open);
        self.recent.clear();
        self.change(
            BreakerState::Open {
                until: now + open_for,
            },
            now,
            reason,
        )
    }

    fn remember(&mut self, now: Instant, failed: bool) {
        self.recent.push_back((now, failed));
        while let Some((at, _)) = self.recent.front() {
            if now.saturating_duration_since(*at) > self.config.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
    }

    fn change(&mut self, to: BreakerState, now: Instant, reason: String) -> Transition {
        let from = self.state.name();
        self.state = to;
        self.since = now;
        Transition {
            from,
            to: to.name(),
            reason,
            consecutive_failures: self.consecutive_failures,
            open_until: self.open_until(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: BreakerConfig = BreakerConfig {
        failure_threshold: 3,
        failure_ratio: 0.5,
        min_requests: 10,
        window: Duration::from_secs(60),
        open: Duration::from_secs(10),
        max_open: Duration::from_secs(25),
        half_open_probes: 1,
    };

    #[test]
    fn opens_after_consecutive_failures_and_holds() {
        let t0 = Instant::now();
        let mut breaker = CircuitBreaker::new(CONFIG, t0);
        assert_eq!(breaker.on_failure(t0), None);
        assert_eq!(breaker.on_failure(t0), None);
        let opened = breaker.on_failure(t0).expect("third failure trips");
        assert_eq!((opened.from, opened.to), ("closed", "open"));
        assert_eq!(opened.consecutive_failures, 3);
        assert_eq!(opened.open_until, Some(t0 + Duration::from_secs(10)));
        assert_eq!(
            breaker.try_acquire(t0 + Duration::from_secs(9)),
            (false, None)
        );
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let t0 = Instant::now();
        let mut breaker = CircuitBreaker::new(CONFIG, t0);
        breaker.on_failure(t0);
        breaker.on_failure(t0);
        breaker.on_success(t0);
        assert_eq!(breaker.on_failure(t0), None);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn probes_then_closes_on_success() {
        let t0 = Instant::now();
        let mut breaker = CircuitBreaker::new(CONFIG, t0);
        for _ in 0..3 {
            breaker.on_failure(t0);
        }
        let t1 = t0 + Duration::from_secs(10);
        let (allowed, transition) = breaker.try_acquire(t1);
        assert!(allowed);
        assert_eq!(transition.unwrap().to, "half_open");
        assert_eq!(
            breaker.try_acquire(t1),
            (false, None),
            "one probe at a time"
        );
        let closed = breaker.on_success(t1).unwrap();
        assert_eq!((closed.from, closed.to), ("half_open", "closed"));
        assert_eq!(breaker.try_acquire(t1), (true, None));
    }

    #[test]
    fn a_failed_probe_reopens_for_longer_up_to_the_cap() {
        let t0 = Instant::now();
        let mut breaker = CircuitBreaker::new(CONFIG, t0);
        for _ in 0..3 {
            breaker.on_failure(t0);
        }
        let t1 = t0 + Duration::from_secs(10);
        breaker.try_acquire(t1);
        let reopened = breaker.on_failure(t1).unwrap();
        assert_eq!((reopened.from, reopened.to), ("half_open", "open"));
        assert_eq!(reopened.open_until, Some(t1 + Duration::from_secs(20)));
        let t2 = t1 + Duration::from_secs(20);
        breaker.try_acquire(t2);
        let capped = breaker.on_failure(t2).unwrap();
        assert_eq!(capped.open_until, Some(t2 + Duration::from_secs(25)));
    }

    #[test]
    fn opens_on_failure_ratio_over_the_window() {
        let t0 = Instant::now();
        let mut breaker = CircuitBreaker::new(
            BreakerConfig {
                failure_threshold: 100,
                ..CONFIG
            },
            t0,
        );
        let mut tripped = None;
        for i in 0..12 {
            if i % 3 == 0 {
                breaker.on_success(t0);
            } else if let Some(t) = breaker.on_failure(t0) {
                tripped = Some((i, t));
                break;
            }
        }
        let (at, transition) = tripped.expect("more than half failed");
        assert_eq!(at, 10, "the first failure once min_requests is reached");
        assert!(
            transition.reason.contains("7 of the last 11"),
            "{}",
            transition.reason
        );
    }

    #[test]
    fn old_outcomes_leave_the_window() {
        let t0 = Instant::now();
        let mut breaker = CircuitBreaker::new(
            BreakerConfig {
                failure_threshold: 100,
                min_requests: 4,
                ..CONFIG
            },
            t0,
        );
        for _ in 0..3 {
            breaker.on_failure(t0);
        }
        let later = t0 + Duration::from_secs(61);
        breaker.on_success(later);
        assert_eq!(breaker.on_failure(later), None, "the old failures aged out");
    }
}
