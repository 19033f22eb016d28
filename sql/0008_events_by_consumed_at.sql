-- Backfill (`webhook-delivery backfill`) walks the events consumed in a time window in batches.
-- Without this index every batch would scan the whole events table. It is appended to at its
-- right edge (consumed_at only grows), so its upkeep on the claim path is small.
-- Building it on a large table holds writes to events for the build (tens of seconds at 10M
-- rows); consumers retry their claims meanwhile and lose nothing.
CREATE INDEX events_by_consumed_at ON events (consumed_at, kafka_partition, kafka_offset);
