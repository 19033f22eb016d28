//! Prometheus metrics. One registry per running Application (tests run several in one process).
//! Names follow Prometheus conventions: `_total` counters, base units (`_seconds`).

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::ledger::ErrorKind;

pub struct Metrics {
    registry: Registry,
    pub messages_consumed: IntCounterVec,
    pub messages_rejected: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    pub deliveries: IntCounterVec,
    pub attempts: IntCounterVec,
    pub attempt_duration: HistogramVec,
    /// One group-commit statement of attempt outcomes, all brokers together.
    pub outcome_write_duration: Histogram,
    /// Per outcome, from its decision to its save: how long its load's lane waits for the
    /// ledger before its next delivery may go.
    pub outcome_save_wait: Histogram,
    pub circuit_state: IntGaugeVec,
    pub mailbox_depth: IntGaugeVec,
    pub in_flight: IntGaugeVec,
    pub in_flight_limit: IntGaugeVec,
    /// Lanes (loads with deliveries in memory) by where they wait, all brokers together,
    /// sampled every second: `LaneCensus::STATES`.
    pub lanes: IntGaugeVec,
    pub buffered_bytes: IntGauge,
    pub buffered_bytes_max: IntGauge,
    pub outbound_connections: IntGauge,
    pub outbound_connections_max: IntGauge,
    pub local_shortages: IntCounter,
    /// Ledger pages (sweeps' reads of pending rows), all brokers together, and the rows they
    /// brought: against `deliveries_total`, how often the ledger is read per delivery.
    pub ledger_pages: IntCounter,
    pub ledger_page_rows: IntCounter,
    pub pending_deliveries: IntGauge,
    pub dead_deliveries: IntGauge,
    pub actor_restarts: IntCounterVec,
    pub oldest_pending_age: Gauge,
    pub ready: IntGauge,
    pub partition_stalled: IntGaugeVec,
    pub outcome_write_stalled: IntGaugeVec,
    pub ledger_errors: IntCounterVec,
    pub retention_removed: IntCounterVec,
    pub retention_passes: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("webhook_delivery".into()), None)
            .expect("a fixed prefix is valid");
        fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        }
        fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        }
        let pending_deliveries = IntGauge::new(
            "pending_deliveries",
            "Deliveries waiting to be sent or retried (whole ledger).",
        )
        .expect("valid metric");
        let dead_deliveries = IntGauge::new(
            "dead_deliveries",
            "Dead-lettered deliveries (whole ledger).",
        )
        .expect("valid metric");
        let oldest_pending_age = Gauge::new(
            "oldest_pending_age_seconds",
            "How long the most overdue pending delivery has been due without being sent (whole \
             ledger; 0 when none is due). A delivery waiting for its next retry counts from its \
             retry time, so retries on schedule keep this near 0; an open breaker, a load held \
             behind a retrying delivery or a partition nobody holds make it grow.",
        )
        .expect("valid metric");
        let ready = IntGauge::new(
            "ready",
            "1 when this instance is ready as /readyz judges it (Postgres answers, group joined, \
             nothing broken), else 0.",
        )
        .expect("valid metric");
        let buffered_bytes = IntGauge::new(
            "buffered_bytes",
            "Bytes of deliveries held in memory by all DeliveryActors (payloads plus a fixed \
             overhead each), bounded by delivery.max_buffered_bytes.",
        )
        .expect("valid metric");
        let buffered_bytes_max = IntGauge::new(
            "buffered_bytes_max",
            "delivery.max_buffered_bytes: the bound on buffered_bytes.",
        )
        .expect("valid metric");
        let outbound_connections = IntGauge::new(
            "outbound_connections",
            "Webhook sockets open now, all brokers together (in use or idle in a pool), bounded \
             by outbound_connections_max.",
        )
        .expect("valid metric");
        let outbound_connections_max = IntGauge::new(
            "outbound_connections_max",
            "The outbound connection budget: delivery.max_outbound_connections, or three \
             quarters of the open-files limit when that is 0.",
        )
        .expect("valid metric");
        let local_shortages = IntCounter::new(
            "local_shortages_total",
            "Requests not made because this process was out of its outbound connection budget \
             or of file descriptors, ports or buffers: not counted against the broker, which \
             pauses a second. Any increase means the budget or the open-files limit is too small \
             for the active brokers.",
        )
        .expect("valid metric");
        let ledger_pages = IntCounter::new(
            "ledger_pages_total",
            "Pages of pending deliveries read from the ledger by brokers' sweeps, all brokers \
             together.",
        )
        .expect("valid metric");
        let ledger_page_rows = IntCounter::new(
            "ledger_page_rows_total",
            "Rows those pages brought. Compare with deliveries_total: a few per delivery is \
             normal (held rows are read again when a sweep starts over); rows rising while \
             deliveries do not means sweeps read what cannot go.",
        )
        .expect("valid metric");
        for metric in [&local_shortages, &ledger_pages, &ledger_page_rows] {
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
        }
        for metric in [
            &pending_deliveries,
            &ready,
            &buffered_bytes,
            &buffered_bytes_max,
            &outbound_connections,
            &outbound_connections_max,
        ] {
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
        }
        registry
            .register(Box::new(oldest_pending_age.clone()))
            .expect("registered once");
        registry
            .register(Box::new(dead_deliveries.clone()))
            .expect("registered once");
        let attempt_duration = HistogramVec::new(
            HistogramOpts::new(
                "attempt_duration_seconds",
                "Time from sending a webhook to its outcome (response or error).",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["outcome"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(attempt_duration.clone()))
            .expect("registered once");
        // Milliseconds matter here: a lane's cycle is a round trip plus this.
        let ledger_buckets = vec![
            0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 5.0,
        ];
        let histogram = |name: &str, help: &str| {
            let metric = Histogram::with_opts(
                HistogramOpts::new(name, help).buckets(ledger_buckets.clone()),
            )
            .expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        };
        let outcome_write_duration = histogram(
            "outcome_write_duration_seconds",
            "One statement writing attempt outcomes (all brokers' outcomes queued meanwhile), to its commit.",
        );
        let outcome_save_wait = histogram(
            "outcome_save_wait_seconds",
            "Per attempt outcome, from its decision to its commit: how long its load's next delivery waits for the ledger.",
        );
        let metrics = Metrics {
            outcome_write_duration,
            outcome_save_wait,
            messages_consumed: counter(
                &registry,
                "messages_consumed_total",
                "Kafka messages read and written to the ledger.",
                &["partition"],
            ),
            messages_rejected: counter(
                &registry,
                "messages_rejected_total",
                "Kafka messages that were not valid events (recorded in rejected_messages).",
                &["partition"],
            ),
            consumer_lag: gauge(
                &registry,
                "consumer_lag_messages",
                "High watermark minus the group's committed offset, per assigned partition.",
                &["partition"],
            ),
            deliveries: counter(
                &registry,
                "deliveries_total",
                "Attempt outcomes: delivered, retry (scheduled again) or dead.",
                &["outcome"],
            ),
            attempts: counter(
                &registry,
                "attempts_total",
                "Webhook attempts by result class: 2xx, 3xx, 4xx, 5xx, transport_error, not_sent.",
                &["result"],
            ),
            attempt_duration,
            circuit_state: gauge(
                &registry,
                "circuit_state",
                "Per-broker circuit breaker: 0 closed, 1 half-open, 2 open.",
                &["broker_id"],
            ),
            mailbox_depth: gauge(
                &registry,
                "mailbox_depth",
                "Deliveries held in memory per broker.",
                &["broker_id"],
            ),
            in_flight: gauge(
                &registry,
                "in_flight_requests",
                "Webhook requests in flight per broker (answered ones awaiting their outcome's save are \
                 not counted: see lanes{state=\"awaiting_save\"}).",
                &["broker_id"],
            ),
            in_flight_limit: gauge(
                &registry,
                "in_flight_limit",
                "Requests allowed at once per broker: the adaptive limit, or max_in_flight_per_broker.",
                &["broker_id"],
            ),
            lanes: gauge(
                &registry,
                "lanes",
                "Loads with deliveries in memory, all brokers together, by what their next delivery \
                 waits for: in_flight (the endpoint), awaiting_save (the ledger: the previous \
                 outcome's commit), ready (a request slot, or an open breaker), waiting_retry (a \
                 retry's time). Sampled every second.",
                &["state"],
            ),
            buffered_bytes,
            buffered_bytes_max,
            outbound_connections,
            outbound_connections_max,
            local_shortages,
            ledger_pages,
            ledger_page_rows,
            pending_deliveries,
            dead_deliveries,
            actor_restarts: counter(
                &registry,
                "actor_restarts_total",
                "Actors restarted by their supervisor after a contained panic.",
                &["actor"],
            ),
            oldest_pending_age,
            ready,
            partition_stalled: gauge(
                &registry,
                "partition_stalled",
                "1 while a partition has lag and its committed offset has not moved for kafka.stall_after_ms.",
                &["partition"],
            ),
            outcome_write_stalled: gauge(
                &registry,
                "outcome_write_stalled",
                "1 while a broker's attempt outcomes could not be written for kafka.stall_after_ms.",
                &["broker_id"],
            ),
            ledger_errors: counter(
                &registry,
                "ledger_errors_total",
                "Failed ledger calls by operation and kind: retryable (retried), data (rows set aside), other.",
                &["operation", "kind"],
            ),
            retention_removed: counter(
                &registry,
                "retention_removed_total",
                "Rows removed by the retention cleaner, per table (only the instance that cleans counts).",
                &["table"],
            ),
            retention_passes: counter(
                &registry,
                "retention_passes_total",
                "Retention passes by result: cleaned (this instance cleaned), skipped (another instance \
                 was cleaning), failed (see the log; the next pass tries again).",
                &["result"],
            ),
            registry,
        };
        // Series that exist from the start read 0 rather than absent, so an alert on
        // `increase(...)` also fires on the very first delivery gone dead or actor restart.
        for outcome in ["delivered", "retry", "dead"] {
            metrics.deliveries.with_label_values(&[outcome]);
        }
        metrics.actor_restarts.with_label_values(&["delivery"]);
        for state in crate::core::lanes::LaneCensus::STATES {
            metrics.lanes.with_label_values(&[state]);
        }
        for table in crate::retention::TABLES {
            metrics.retention_removed.with_label_values(&[table]);
        }
        for result in ["cleaned", "skipped", "failed"] {
            metrics.retention_passes.with_label_values(&[result]);
        }
        // The two writes every event and every attempt go through.
        for operation in ["claim", "record_attempts"] {
            for kind in [ErrorKind::Retryable, ErrorKind::Data, ErrorKind::Other] {
                metrics
                    .ledger_errors
                    .with_label_values(&[operation, kind.as_str()]);
            }
        }
        metrics
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The numeric value of a breaker state for the `circuit_state` gauge.
pub fn circuit_state_value(state: &str) -> i64 {
    match state {
        "open" => 2,
        "half_open" => 1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_the_prefix() {
        let metrics = Metrics::new();
        metrics.deliveries.with_label_values(&["delivered"]).inc();
        metrics.circuit_state.with_label_values(&["acme"]).set(2);
        metrics
            .attempt_duration
            .with_label_values(&["delivered"])
            .observe(0.02);
        let text = metrics.render();
        assert!(text.contains("webhook_delivery_deliveries_total{outcome=\"delivered\"} 1"));
        assert!(text.contains("webhook_delivery_circuit_state{broker_id=\"acme\"} 2"));
        assert!(text.contains("# TYPE webhook_delivery_attempt_duration_seconds histogram"));
        // The ledger histograms exist before their first write, with millisecond buckets.
        assert!(text.contains("webhook_delivery_outcome_write_duration_seconds_count 0"));
        assert!(text.contains("webhook_delivery_outcome_save_wait_seconds_bucket{le=\"0.001\"} 0"));
    }
}
