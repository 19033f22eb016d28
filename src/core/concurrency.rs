//! How many requests one broker gets at once: an adaptive limit (additive increase,
//! multiplicative decrease on the round-trip time, after Vector's adaptive request concurrency
//! and TCP congestion control).
//!
//! A broker's endpoint is measured one window at a time; a window lasts about one average round
//! trip. At the end of a window:
//! - **grow by one** if requests were waiting for a slot during the window (the limit was
//!   reached), nothing signalled back pressure and the window's mean round trip was no worse
//!   than the long-run average: the endpoint took more without slowing down;
//! - **shrink to 90 %** if the endpoint signalled back pressure (a 429, a 5xx, a timeout or a
//!   failed connection) or the window's mean round trip rose more than 2.5 standard deviations
//!   above the long-run average: requests queue at the endpoint, so more would add only latency;
//! - otherwise keep it.
//!
//! The limit stays within 1 and `max` (`delivery.max_in_flight_per_broker`). With
//! `delivery.adaptive_in_flight = false` it is fixed at `max`.

use std::time::Duration;

use super::Millis;

/// Weight of the newest window in the long-run round-trip average.
const EWMA_ALPHA: f64 = 0.4;
/// How far above the long-run average (in standard deviations) a window's round trip counts as
/// a slowdown.
const DEVIATION_SCALE: f64 = 2.5;
/// The new limit after back pressure, as a fraction of the old one (rounded down).
const DECREASE_RATIO: f64 = 0.9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyConfig {
    /// The most requests at once (`delivery.max_in_flight_per_broker`).
    pub max: usize,
    /// Whether the limit adapts (`delivery.adaptive_in_flight`); if not, it is `max`.
    pub adaptive: bool,
}

impl ConcurrencyConfig {
    /// Where an adaptive limit starts: a quarter of the ceiling, so a new broker's endpoint is
    /// not hit with the full ceiling before anything is known about it.
    fn initial(&self) -> usize {
        if self.adaptive {
            (self.max / 4).max(1)
        } else {
            self.max.max(1)
        }
    }
}

/// How an attempt ended, for the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// The endpoint processed the request (any answer that is not back pressure): its round
    /// trip is a measurement.
    Processed(Duration),
    /// The endpoint is overloaded or unreachable: 429, 5xx, a timeout, a failed connection.
    BackPressure,
    /// No measurement (the request was not made, e.g. refused by the SSRF guard).
    Ignored,
}

/// A running mean and variance with exponential weights.
#[derive(Debug, Clone, Copy)]
struct Ewma {
    mean: f64,
    variance: f64,
}

impl Ewma {
    fn update(&mut self, sample: f64) {
        let difference = sample - self.mean;
        let increment = EWMA_ALPHA * difference;
        self.mean += increment;
        self.variance = (1.0 - EWMA_ALPHA) * (self.variance + difference * increment);
    }
}

/// The measurements of the current window.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    rtt_sum: f64,
    samples: u32,
    reached_limit: bool,
    back_pressure: bool,
}

#[derive(Debug, Clone)]
pub struct ConcurrencyLimit {
    config: ConcurrencyConfig,
    limit: usize,
    /// The long-run round trip in milliseconds; `None` until the first measurement.
    past: Option<Ewma>,
    window: Window,
    window_ends: Millis,
}

impl ConcurrencyLimit {
    pub fn new(config: ConcurrencyConfig) -> Self {
        ConcurrencyLimit {
            config,
            limit: config.initial(),
            past: None,
            window: Window::default(),
            window_ends: Millis(0),
        }
    }

    /// Requests allowed at once now.
    pub fn current(&self) -> usize {
        self.limit
    }

    /// A request was started; `in_flight` counts it.
    pub fn request_started(&mut self, in_flight: usize) {
        if in_flight >= self.limit {
            self.window.reached_limit = true;
        }
    }

    /// This process could not give the broker another socket (out of file descriptors or of its
    /// outbound connection budget) while `holding` of its requests were in flight: the limit
    /// comes down to what it holds, at least 1, so the broker goes on with the sockets it has
    /// instead of asking for more each time one comes free; it grows again one at a time while
    /// the endpoint keeps up, each step one more try for a socket. Not back pressure: the
    /// endpoint's round trips say nothing of it.
    pub fn local_shortage(&mut self, holding: usize) {
        if self.config.adaptive {
            self.limit = self.limit.min(holding.max(1));
        }
    }

    /// A request ended; if that closes a window, the limit is judged again.
    pub fn request_finished(&mut self, now: Millis, response: Response) {
        match response {
            Response::Processed(rtt) => {
                self.window.rtt_sum += rtt.as_secs_f64() * 1_000.0;
                self.window.samples += 1;
            }
            Response::BackPressure => self.window.back_pressure = true,
            Response::Ignored => {}
        }
        let current =
            (self.window.samples > 0).then(|| self.window.rtt_sum / f64::from(self.window.samples));
        let Some(mut past) = self.past else {
            if let Some(current) = current {
                self.past = Some(Ewma {
                    mean: current,
                    variance: 0.0,
                });
                self.close_window(now, current);
            }
            return;
        };
        if now < self.window_ends {
            return;
        }
        if self.config.adaptive {
            self.adjust(past, current);
        }
        if let Some(current) = current {
            past.update(current);
            self.past = Some(past);
        }
        self.close_window(now, past.mean);
    }

    fn adjust(&mut self, past: Ewma, current: Option<f64>) {
        let window = self.window;
        let threshold = past.variance.sqrt() * DEVIATION_SCALE;
        let no_slower = current.is_some_and(|rtt| rtt <= past.mean);
        let slower = current.is_some_and(|rtt| rtt > past.mean + threshold);
        if self.limit < self.config.max
            && window.reached_limit
            && !window.back_pressure
            && no_slower
        {
            self.limit += 1;
        } else if self.limit > 1 && (window.back_pressure || slower) {
            self.limit = ((self.limit as f64 * DECREASE_RATIO) as usize).max(1);
        }
    }

    /// Starts the next window, about one round trip long (at least a millisecond, the
    /// scheduler clock's resolution).
    fn close_window(&mut self, now: Millis, rtt_ms: f64) {
        self.window = Window::default();
        let length = Duration::from_secs_f64((rtt_ms / 1_000.0).max(0.001));
        self.window_ends = now + length;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_shortage_brings_the_limit_down_to_the_sockets_held() {
        let mut limit = ConcurrencyLimit::new(ADAPTIVE);
        assert_eq!(limit.current(), 16);
        limit.local_shortage(5);
        assert_eq!(limit.current(), 5);
        limit.local_shortage(0);
        assert_eq!(limit.current(), 1, "never below one");
        limit.local_shortage(9);
        assert_eq!(limit.current(), 1, "a shortage never raises it");
        let mut fixed = ConcurrencyLimit::new(ConcurrencyConfig {
            max: 8,
            adaptive: false,
        });
        fixed.local_shortage(2);
        assert_eq!(fixed.current(), 8, "a fixed limit stays fixed");
    }

    const ADAPTIVE: ConcurrencyConfig = ConcurrencyConfig {
        max: 64,
        adaptive: true,
    };

    /// One window's worth of `count` requests answered in `rtt_ms`, all slots taken.
    fn window(limit: &mut ConcurrencyLimit, now: &mut u64, rtt_ms: u64, count: usize) {
        for _ in 0..count {
            limit.request_started(limit.current());
        }
        *now += rtt_ms;
        for _ in 0..count {
            limit.request_finished(
                Millis(*now),
                Response::Processed(Duration::from_millis(rtt_ms)),
            );
        }
    }

    #[test]
    fn it_starts_at_a_quarter_of_the_ceiling_and_a_fixed_one_stays_at_the_ceiling() {
        assert_eq!(ConcurrencyLimit::new(ADAPTIVE).current(), 16);
        let fixed = ConcurrencyConfig {
            max: 16,
            adaptive: false,
        };
        let mut limit = ConcurrencyLimit::new(fixed);
        let mut now = 0;
        for _ in 0..10 {
            window(&mut limit, &mut now, 2, 16);
        }
        limit.request_finished(Millis(now + 10), Response::BackPressure);
        limit.request_finished(Millis(now + 20), Response::BackPressure);
        assert_eq!(limit.current(), 16);
    }

    #[test]
    fn a_steady_endpoint_that_is_kept_busy_gets_more_up_to_the_ceiling() {
        let mut limit = ConcurrencyLimit::new(ADAPTIVE);
        let mut now = 0;
        for _ in 0..200 {
            let busy = limit.current();
            window(&mut limit, &mut now, 3, busy);
        }
        assert_eq!(limit.current(), 64);
    }

    #[test]
    fn no_growth_without_evidence_that_more_would_be_used() {
        let mut limit = ConcurrencyLimit::new(ADAPTIVE);
        let mut now = 0;
        for _ in 0..50 {
            // Four loads, so at most four requests out: the limit is never reached.
            now += 3;
            for _ in 0..4 {
                limit.request_started(4);
                limit.request_finished(Millis(now), Response::Processed(Duration::from_millis(3)));
            }
        }
        assert_eq!(limit.current(), 16);
    }

    #[test]
    fn back_pressure_shrinks_it_to_one_at_least() {
        let mut limit = ConcurrencyLimit::new(ADAPTIVE);
        let mut now = 0;
        window(&mut limit, &mut now, 3, 16);
        let mut changes = Vec::new();
        for _ in 0..100 {
            now += 3;
            let before = limit.current();
            limit.request_finished(Millis(now), Response::BackPressure);
            if limit.current() != before {
                changes.push(limit.current());
            }
        }
        assert_eq!(changes[..3], [14, 12, 10]);
        assert_eq!(limit.current(), 1);
    }

    #[test]
    fn a_slower_endpoint_gets_fewer() {
        let mut limit = ConcurrencyLimit::new(ADAPTIVE);
        let mut now = 0;
        for rtt in [10, 11, 10, 9, 10, 11, 10, 10] {
            let busy = limit.current();
            window(&mut limit, &mut now, rtt, busy);
        }
        let before = limit.current();
        // Requests start to queue at the endpoint: the round trip doubles.
        window(&mut limit, &mut now, 20, before);
        window(&mut limit, &mut now, 20, before);
        assert!(
            limit.current() < before,
            "{} after a slowdown, {before} before",
            limit.current()
        );
    }
}
