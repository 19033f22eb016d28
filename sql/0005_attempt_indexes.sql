-- Fewer indexes on the hottest table: every attempt inserts a row. The duplicates report reads
-- delivered attempts by time; nothing reads attempts by broker and time, or all attempts by time.
DROP INDEX delivery_attempts_by_time;
DROP INDEX delivery_attempts_delivered;
CREATE INDEX delivery_attempts_delivered_by_time ON delivery_attempts (started_at)
    WHERE outcome = 'delivered';
