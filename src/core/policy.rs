//! The delivery policy on one screen: what each response means, and when to try again.
//! Pure: no I/O, no clock (callers pass `now` and the jitter draw).
//!
//! | what the broker did                                   | verdict                          |
//! |-------------------------------------------------------|----------------------------------|
//! | 2xx                                                   | delivered                        |
//! | 410 Gone                                              | dead, and the broker is disabled |
//! | 408, 425, 429, 5xx                                    | retry (429/503 honour Retry-After)|
//! | any other 4xx, any 3xx (redirects are not followed)   | dead on the first attempt        |
//! | 1xx or other non-standard codes                       | retry                            |
//! | timed out, connection refused/reset, DNS, TLS errors  | retry                            |
//! | (DNS includes an answer with no address at all)       |                                  |
//! | the SSRF guard refuses the URL or every address       | dead                             |
//! | our own request could not be built (bad URL, secret)  | dead                             |
//!
//! A retry is scheduled `base_delay * 2^(attempt-1)`, capped at `max_delay`, with ±20 % jitter;
//! after `max_attempts` attempts the delivery is dead. Only the failed (event, broker) pair is
//! retried: nothing else is ever re-sent.

use std::time::Duration;

/// What one attempt produced, as far as the policy cares.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptResult {
    /// The broker answered with this status. `retry_after` is its parsed Retry-After header.
    Responded {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// No (complete) answer: timeout, refused, reset, DNS, TLS.
    TransportFailed,
    /// We could not even build the request (invalid URL or secret in the broker row).
    RequestInvalid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Retry,
    Dead,
    /// 410 Gone: the broker asked us to stop sending. Dead, and the broker is disabled.
    DeadAndDisableBroker,
}

pub fn classify(result: &AttemptResult) -> Verdict {
    match result {
        AttemptResult::Responded { status, .. } => match *status {
            200..=299 => Verdict::Delivered,
            410 => Verdict::DeadAndDisableBroker,
            408 | 425 | 429 => Verdict::Retry,
            500..=599 => Verdict::Retry,
            300..=499 => Verdict::Dead,
            _ => Verdict::Retry,
        },
        AttemptResult::TransportFailed => Verdict::Retry,
        AttemptResult::RequestInvalid => Verdict::Dead,
    }
}

/// `[retry]` in the config, as data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// Delay before the next attempt after `attempts_made` failed attempts, or `None` when the
    /// budget is spent. `jitter` is a draw from [0, 1); it maps to a factor in [0.8, 1.2).
    pub fn next_delay(
        &self,
        attempts_made: u32,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Option<Duration> {
        if attempts_made >= self.max_attempts {
            return None;
        }
        if let Some(asked) = retry_after {
            return Some(asked.min(self.max_delay));
        }
        let exponent = attempts_made.saturating_sub(1).min(30);
        let backoff = self
            .base_delay
            .saturating_mul(1u32 << exponent)
            .min(self.max_delay);
        let factor = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
        Some(backoff.mul_f64(factor).min(self.max_delay))
    }
}

/// Parses a Retry-After header: delay-seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (date.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> AttemptResult {
        AttemptResult::Responded {
            status: code,
            retry_after: None,
        }
    }

    #[test]
    fn classification_table_row_by_row() {
        let rows = [
            (200, Verdict::Delivered),
            (201, Verdict::Delivered),
            (204, Verdict::Delivered),
            (299, Verdict::Delivered),
            (410, Verdict::DeadAndDisableBroker),
            (408, Verdict::Retry),
            (425, Verdict::Retry),
            (429, Verdict::Retry),
            (500, Verdict::Retry),
            (502, Verdict::Retry),
            (503, Verdict::Retry),
            (504, Verdict::Retry),
            (599, Verdict::Retry),
            (400, Verdict::Dead),
            (401, Verdict::Dead),
            (403, Verdict::Dead),
            (404, Verdict::Dead),
            (413, Verdict::Dead),
            (422, Verdict::Dead),
            (301, Verdict::Dead),
            (302, Verdict::Dead),
            (307, Verdict::Dead),
            (100, Verdict::Retry),
            (600, Verdict::Retry),
        ];
        for (code, verdict) in rows {
            assert_eq!(classify(&status(code)), verdict, "status {code}");
        }
        assert_eq!(classify(&AttemptResult::TransportFailed), Verdict::Retry);
        assert_eq!(classify(&AttemptResult::RequestInvalid), Verdict::Dead);
    }

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 5,
        base_delay: Duration::from_secs(10),
        max_delay: Duration::from_secs(60),
    };

    #[test]
    fn backoff_doubles_then_caps() {
        let delays: Vec<_> = (1..5)
            .map(|n| POLICY.next_delay(n, None, 0.5).unwrap())
            .collect();
        assert_eq!(
            delays,
            [10, 20, 40, 60].map(Duration::from_secs).to_vec(),
            "jitter 0.5 is the midpoint, factor 1.0"
        );
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        assert_eq!(
            POLICY.next_delay(1, None, 0.0),
            Some(Duration::from_secs(8))
        );
        let high = POLICY.next_delay(1, None, 0.999_999).unwrap();
        assert!(high > Duration::from_millis(11_990) && high < Duration::from_secs(12));
        assert_eq!(
            POLICY.next_delay(4, None, 1.0),
            Some(Duration::from_secs(60)),
            "never above max_delay"
        );
    }

    #[test]
    fn budget_is_bounded() {
        assert!(POLICY.next_delay(4, None, 0.5).is_some());
        assert_eq!(POLICY.next_delay(5, None, 0.5), None);
        assert_eq!(
            POLICY.next_delay(5, Some(Duration::from_secs(1)), 0.5),
            None
        );
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        assert_eq!(
            POLICY.next_delay(1, Some(Duration::from_secs(3)), 0.5),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            POLICY.next_delay(1, Some(Duration::from_secs(3600)), 0.5),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
