//! Consumer lag over time: every 500 ms, the group's committed offsets against the high
//! watermarks, read the way `webhook-delivery status` reads them (it never joins the group).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use webhook_delivery::config::KafkaSettings;
use webhook_delivery::offsets::partition_offsets;

use crate::event::now_micros;

pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// A sampler nobody stopped gives up after this long (the longest run, `soak`, produces for
/// 30 minutes after its warm-up and drains after).
const MAX_SAMPLING: Duration = Duration::from_secs(45 * 60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagPoint {
    pub at_micros: u64,
    /// Sum over partitions.
    pub lag: i64,
}

pub struct LagSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<LagPoint>>,
}

impl LagSampler {
    pub fn start(kafka: KafkaSettings) -> LagSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let began = Instant::now();
            let mut points = Vec::new();
            while !stopped.load(Ordering::Relaxed) && began.elapsed() < MAX_SAMPLING {
                let tick = Instant::now();
                // A failed read (broker busy) is a gap in the series, not a zero.
                if let Ok(offsets) = partition_offsets(&kafka, READ_TIMEOUT) {
                    points.push(LagPoint {
                        at_micros: now_micros(),
                        lag: offsets.iter().map(|p| p.lag).sum(),
                    });
                }
                let rest = SAMPLE_EVERY.saturating_sub(tick.elapsed());
                std::thread::sleep(rest);
            }
            points
        });
        LagSampler { stop, thread }
    }

    pub async fn stop(self) -> Vec<LagPoint> {
        self.stop.store(true, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || self.thread.join().unwrap_or_default())
            .await
            .unwrap_or_default()
    }
}
