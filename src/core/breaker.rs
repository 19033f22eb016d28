//! A broker's circuit breaker. Pure: the caller passes `now`; every state change comes back as a
//! `Transition` for the caller to log (one line per change, docs/design.md 7).
//!
//! closed ──(failure_threshold consecutive retryable failures, or failure ratio over the window
//!          above failure_ratio with at least min_requests)──► open
//! open ──(open duration passed; it doubles on each trip, capped at max_open)──► half-open
//! half-open ──(a probe succeeds)──► closed
//! half-open ──(a probe fails, or gets no answer within probe_timeout)──► open
//!
//! A probe slot is taken only when a request is really started (`request_started`), and given
//! back when it was not made after all (`request_not_made`). So half-open always has a probe in
//! flight or one due: it cannot get stuck waiting for an answer that never comes.

use std::collections::VecDeque;
use std::time::Duration;

use super::Millis;

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

/// Identifies one probe request, so a late answer to an old probe changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProbeId(u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open {
        until: Millis,
    },
    /// Probes in flight, each with when it started.
    HalfOpen {
        probes: Vec<(ProbeId, Millis)>,
    },
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
    pub open_until: Option<Millis>,
}

/// What became of a request, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// The endpoint answered in a way that shows it is up (2xx, or a permanent 4xx).
    Success,
    /// A retryable failure: timeout, connection error, 408/425/429/5xx.
    Failure,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    /// How long a half-open probe may go unanswered before it counts as failed.
    probe_timeout: Duration,
    state: BreakerState,
    since: Millis,
    consecutive_failures: u32,
    /// Outcomes inside the rolling window: (when, failed).
    recent: VecDeque<(Millis, bool)>,
    /// Trips since the breaker was last closed by a success; grows the open time.
    trips: u32,
    next_probe: u64,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig, probe_timeout: Duration, now: Millis) -> Self {
        CircuitBreaker {
            config,
            probe_timeout,
            state: BreakerState::Closed,
            since: now,
            consecutive_failures: 0,
            recent: VecDeque::new(),
            trips: 0,
            next_probe: 0,
        }
    }

    pub fn state(&self) -> &BreakerState {
        &self.state
    }

    pub fn since(&self) -> Millis {
        self.since
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn open_until(&self) -> Option<Millis> {
        match self.state {
            BreakerState::Open { until } => Some(until),
            _ => None,
        }
    }

    pub fn probes_in_flight(&self) -> usize {
        match &self.state {
            BreakerState::HalfOpen { probes } => probes.len(),
            _ => 0,
        }
    }

    /// Moves the state on with time: open to half-open when the open period is over, half-open
    /// back to open when a probe has gone unanswered for `probe_timeout`.
    pub fn poll(&mut self, now: Millis) -> Option<Transition> {
        match &self.state {
            BreakerState::Open { until } if now >= *until => Some(self.change(
                BreakerState::HalfOpen { probes: Vec::new() },
                now,
                "open period over; probing".into(),
            )),
            BreakerState::HalfOpen { probes } => {
                let oldest = probes.iter().map(|(_, started)| *started).min()?;
                (now >= oldest + self.probe_timeout).then(|| {
                    let reason = format!(
                        "probe got no answer within {} ms",
                        self.probe_timeout.as_millis()
                    );
                    self.trip(now, reason)
                })
            }
            _ => None,
        }
    }

    /// When `poll` next has something to do, if ever.
    pub fn deadline(&self) -> Option<Millis> {
        match &self.state {
            BreakerState::Closed => None,
            BreakerState::Open { until } => Some(*until),
            BreakerState::HalfOpen { probes } => probes
                .iter()
                .map(|(_, started)| *started + self.probe_timeout)
                .min(),
        }
    }

    /// May a request start now? Asks only; `request_started` takes the slot.
    pub fn may_request(&self) -> bool {
        match &self.state {
            BreakerState::Closed => true,
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { probes } => {
                probes.len() < self.config.half_open_probes.max(1) as usize
            }
        }
    }

    /// A request is really being made. In half-open it is a probe: its id comes back.
    pub fn request_started(&mut self, now: Millis) -> Option<ProbeId> {
        let BreakerState::HalfOpen { probes } = &mut self.state else {
            return None;
        };
        self.next_probe += 1;
        let probe = ProbeId(self.next_probe);
        probes.push((probe, now));
        Some(probe)
    }

    /// The request was not made after all (lease lapsed, the actor restarted, the address was
    /// refused before connecting): its probe slot is free again.
    pub fn request_not_made(&mut self, probe: Option<ProbeId>) {
        if let (BreakerState::HalfOpen { probes }, Some(probe)) = (&mut self.state, probe) {
            probes.retain(|(id, _)| *id != probe);
        }
    }

    /// Every probe in flight was abandoned (the actor restarted and its requests with it).
    pub fn abandon_probes(&mut self) {
        if let BreakerState::HalfOpen { probes } = &mut self.state {
            probes.clear();
        }
    }

    /// An answer (or a transport failure) to a request started with `probe`.
    pub fn on_outcome(
        &mut self,
        now: Millis,
        probe: Option<ProbeId>,
        outcome: RequestOutcome,
    ) -> Option<Transition> {
        let failed = outcome == RequestOutcome::Failure;
        match &self.state {
            BreakerState::Closed => {
                self.remember(now, failed);
                if !failed {
                    self.consecutive_failures = 0;
                    return None;
                }
                self.consecutive_failures += 1;
                if self.consecutive_failures >= self.config.failure_threshold {
                    let reason = format!("{} consecutive failures", self.consecutive_failures);
                    return Some(self.trip(now, reason));
                }
                let total = self.recent.len() as u32;
                let failures = self.recent.iter().filter(|(_, failed)| *failed).count() as u32;
                if total >= self.config.min_requests
                    && f64::from(failures) / f64::from(total) > self.config.failure_ratio
                {
                    let reason = format!("{failures} of the last {total} requests failed");
                    return Some(self.trip(now, reason));
                }
                None
            }
            BreakerState::HalfOpen { probes }
                if probe.is_some_and(|p| probes.iter().any(|(id, _)| *id == p)) =>
            {
                if failed {
                    self.consecutive_failures += 1;
                    Some(self.trip(now, "probe failed".into()))
                } else {
                    self.consecutive_failures = 0;
                    self.trips = 0;
                    Some(self.change(BreakerState::Closed, now, "probe succeeded".into()))
                }
            }
            // Late answers to requests started before the trip (or to a timed-out probe)
            // change nothing.
            _ => None,
        }
    }

    fn trip(&mut self, now: Millis, reason: String) -> Transition {
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

    fn remember(&mut self, now: Millis, failed: bool) {
        self.recent.push_back((now, failed));
        while let Some((at, _)) = self.recent.front() {
            if now.since(*at) > self.config.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
    }

    fn change(&mut self, to: BreakerState, now: Millis, reason: String) -> Transition {
        let from = self.state.name();
        self.state = to;
        self.since = now;
        Transition {
            from,
            to: self.state.name(),
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
    const PROBE_TIMEOUT: Duration = Duration::from_secs(11);
    const T0: Millis = Millis(1_000);

    fn breaker(config: BreakerConfig) -> CircuitBreaker {
        CircuitBreaker::new(config, PROBE_TIMEOUT, T0)
    }

    fn fail(b: &mut CircuitBreaker, now: Millis) -> Option<Transition> {
        b.on_outcome(now, None, RequestOutcome::Failure)
    }

    fn tripped() -> CircuitBreaker {
        let mut b = breaker(CONFIG);
        for _ in 0..3 {
            fail(&mut b, T0);
        }
        b
    }

    #[test]
    fn opens_after_consecutive_failures_and_holds() {
        let mut b = breaker(CONFIG);
        assert_eq!(fail(&mut b, T0), None);
        assert_eq!(fail(&mut b, T0), None);
        let opened = fail(&mut b, T0).expect("third failure trips");
        assert_eq!((opened.from, opened.to), ("closed", "open"));
        assert_eq!(opened.consecutive_failures, 3);
        assert_eq!(opened.open_until, Some(T0 + Duration::from_secs(10)));
        assert_eq!(b.poll(T0 + Duration::from_secs(9)), None);
        assert!(!b.may_request());
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let mut b = breaker(CONFIG);
        fail(&mut b, T0);
        fail(&mut b, T0);
        b.on_outcome(T0, None, RequestOutcome::Success);
        assert_eq!(fail(&mut b, T0), None);
        assert_eq!(b.state(), &BreakerState::Closed);
    }

    #[test]
    fn probes_then_closes_on_success() {
        let mut b = tripped();
        let t1 = T0 + Duration::from_secs(10);
        assert_eq!(b.poll(t1).unwrap().to, "half_open");
        assert!(b.may_request());
        let probe = b.request_started(t1);
        assert!(probe.is_some());
        assert!(!b.may_request(), "one probe at a time");
        let closed = b.on_outcome(t1, probe, RequestOutcome::Success).unwrap();
        assert_eq!((closed.from, closed.to), ("half_open", "closed"));
        assert!(b.may_request());
    }

    #[test]
    fn a_probe_not_made_frees_its_slot() {
        let mut b = tripped();
        let t1 = T0 + Duration::from_secs(10);
        b.poll(t1);
        let probe = b.request_started(t1);
        b.request_not_made(probe);
        assert!(b.may_request(), "the next delivery becomes the probe");
        assert_eq!(
            b.deadline(),
            None,
            "no probe in flight, nothing to time out"
        );
    }

    #[test]
    fn an_unanswered_probe_reopens_the_breaker() {
        let mut b = tripped();
        let t1 = T0 + Duration::from_secs(10);
        b.poll(t1);
        let probe = b.request_started(t1);
        assert_eq!(b.deadline(), Some(t1 + PROBE_TIMEOUT));
        let reopened = b.poll(t1 + PROBE_TIMEOUT).expect("probe timed out");
        assert_eq!((reopened.from, reopened.to), ("half_open", "open"));
        assert_eq!(
            b.on_outcome(t1 + PROBE_TIMEOUT, probe, RequestOutcome::Success),
            None,
            "a late answer to the timed-out probe changes nothing"
        );
    }

    #[test]
    fn late_answers_from_before_the_trip_change_nothing() {
        let mut b = tripped();
        let t1 = T0 + Duration::from_secs(10);
        b.poll(t1);
        assert_eq!(b.on_outcome(t1, None, RequestOutcome::Success), None);
        assert_eq!(b.state().name(), "half_open");
    }

    #[test]
    fn a_failed_probe_reopens_for_longer_up_to_the_cap() {
        let mut b = tripped();
        let t1 = T0 + Duration::from_secs(10);
        b.poll(t1);
        let probe = b.request_started(t1);
        let reopened = b.on_outcome(t1, probe, RequestOutcome::Failure).unwrap();
        assert_eq!((reopened.from, reopened.to), ("half_open", "open"));
        assert_eq!(reopened.open_until, Some(t1 + Duration::from_secs(20)));
        let t2 = t1 + Duration::from_secs(20);
        b.poll(t2);
        let probe = b.request_started(t2);
        let capped = b.on_outcome(t2, probe, RequestOutcome::Failure).unwrap();
        assert_eq!(capped.open_until, Some(t2 + Duration::from_secs(25)));
    }

    #[test]
    fn opens_on_failure_ratio_over_the_window() {
        let mut b = breaker(BreakerConfig {
            failure_threshold: 100,
            ..CONFIG
        });
        let mut tripped = None;
        for i in 0..12 {
            let outcome = if i % 3 == 0 {
                RequestOutcome::Success
            } else {
                RequestOutcome::Failure
            };
            if let Some(t) = b.on_outcome(T0, None, outcome) {
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
        let mut b = breaker(BreakerConfig {
            failure_threshold: 100,
            min_requests: 4,
            ..CONFIG
        });
        for _ in 0..3 {
            fail(&mut b, T0);
        }
        let later = T0 + Duration::from_secs(61);
        b.on_outcome(later, None, RequestOutcome::Success);
        assert_eq!(fail(&mut b, later), None, "the old failures aged out");
    }
}
