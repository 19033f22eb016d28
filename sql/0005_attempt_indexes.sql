-- Fewer indexes on the hottest tables: every delivery inserts a deliveries row, an events row
-- (per event) and at least one attempt, and index upkeep is most of the database's CPU.
-- The duplicates report reads delivered attempts by time; nothing reads attempts by broker and
-- time, or all attempts by time.
DROP INDEX delivery_attempts_by_time;
DROP INDEX delivery_attempts_delivered;
CREATE INDEX delivery_attempts_delivered_by_time ON delivery_attempts (started_at)
    WHERE outcome = 'delivered';
-- The sweep runs once a second over pending rows only; it does not need its own index.
DROP INDEX deliveries_pending_due;
-- Event lookups by eventId use the primary key (the idempotency key is derived from it).
DROP INDEX events_by_event_id;
