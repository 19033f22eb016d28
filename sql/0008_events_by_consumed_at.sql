-- Online (built CONCURRENTLY, no lock that blocks reads or writes). Backfill
-- (`webhook-delivery backfill`) walks the events consumed in a time window in batches; without
-- this index every batch would scan the whole events table. It is appended to at its right edge
-- (consumed_at only grows), so its upkeep on the claim path is small.
DROP INDEX CONCURRENTLY IF EXISTS events_by_consumed_at;
CREATE INDEX CONCURRENTLY IF NOT EXISTS events_by_consumed_at ON events (consumed_at, kafka_partition, kafka_offset);
