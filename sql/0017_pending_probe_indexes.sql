-- Online (built CONCURRENTLY, no lock that blocks reads or writes). The two per-second questions
-- about pending work become index probes bounded by the number of (broker, partition) pairs with
-- pending work, instead of scans of every pending row (docs/performance.md, "Per-second queries"):
-- the ledger sweep asks, per (broker, partition), whether the earliest next_attempt_at is overdue;
-- the oldest-pending gauge and /brokers ask, per broker, for the earliest created_at. The pairs and
-- brokers to probe come from delivery_counts (migration 16). Each index costs one entry per claim
-- and per retry (docs/decisions.md). Optional for the build that needs migration 16: without
-- these the same queries are correct, only not bounded.
DROP INDEX CONCURRENTLY IF EXISTS deliveries_pending_due;
CREATE INDEX CONCURRENTLY IF NOT EXISTS deliveries_pending_due ON deliveries (broker_id, kafka_partition, next_attempt_at)
    WHERE state = 'pending';
DROP INDEX CONCURRENTLY IF EXISTS deliveries_pending_by_age;
CREATE INDEX CONCURRENTLY IF NOT EXISTS deliveries_pending_by_age ON deliveries (broker_id, created_at)
    WHERE state = 'pending';
