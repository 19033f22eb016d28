-- Online (built CONCURRENTLY, no lock that blocks reads or writes): the dead-letter list without a
-- broker filter (`dead-letters list`, GET /dead-letters) walks dead rows in time order and stops
-- at its LIMIT, instead of sorting every dead row of every broker. Dead rows are few on the
-- write path (one index entry per delivery given up on), so the upkeep is negligible.
DROP INDEX CONCURRENTLY IF EXISTS deliveries_dead_by_time;
CREATE INDEX CONCURRENTLY IF NOT EXISTS deliveries_dead_by_time ON deliveries (updated_at, delivery_id)
    WHERE state = 'dead';
