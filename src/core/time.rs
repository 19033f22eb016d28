//! Time as an input. The shell turns its monotonic clock into [`Millis`] (milliseconds since it
//! started); the simulator makes them up. Nothing in the core asks what time it is.

use std::ops::Add;
use std::time::Duration;

/// A point on the caller's monotonic clock, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

impl Millis {
    /// How long after `earlier` this is (zero if it is not after it).
    pub fn since(self, earlier: Millis) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Millis {
    type Output = Millis;

    fn add(self, duration: Duration) -> Millis {
        let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        Millis(self.0.saturating_add(millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_and_measures_without_overflow() {
        let t = Millis(1_000) + Duration::from_millis(500);
        assert_eq!(t, Millis(1_500));
        assert_eq!(t.since(Millis(1_000)), Duration::from_millis(500));
        assert_eq!(Millis(1).since(t), Duration::ZERO);
        assert_eq!(
            Millis(u64::MAX - 1) + Duration::from_secs(1),
            Millis(u64::MAX)
        );
    }
}
