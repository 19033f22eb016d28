-- Online (built CONCURRENTLY, no lock that blocks reads or writes): the retention cleaner
-- removes rejected messages oldest first, a bounded batch per statement (src/retention.rs);
-- without this index every batch would scan the whole table. Rejections are rare on the write
-- path, so the upkeep is negligible.
DROP INDEX CONCURRENTLY IF EXISTS rejected_messages_by_time;
CREATE INDEX CONCURRENTLY IF NOT EXISTS rejected_messages_by_time ON rejected_messages (rejected_at);
