-- Transactional; required from this build on. The attempt that delivers a delivery is kept on
-- the delivery's own row instead of as a `delivery_attempts` row: nearly every delivery
-- succeeds at its first attempt, so this takes one heap row and three index entries
-- (delivery_attempts' primary key, _by_delivery, _delivered_by_time) off the write of nearly
-- every outcome (docs/decisions.md 17, docs/performance.md "Index writes per delivery").
-- `delivery_attempts` keeps every attempt that did not deliver, and a 2xx for a delivery that
-- was no longer pending (a second send: what `report duplicates` looks for).
--
-- Locks: ACCESS EXCLUSIVE on `deliveries` for a catalogue change only (nullable columns without
-- a default rewrite nothing): milliseconds once granted. The shorter lock_timeout bounds how long
-- claims and outcome writes can queue behind this ALTER while it waits for the lock; if it gives
-- up, nothing was changed, and `migrate` is simply run again. The previous release keeps working
-- on this schema: it does not know the columns and writes every attempt to delivery_attempts,
-- which the view below and the reports read as before.
SET LOCAL lock_timeout = '1s';
ALTER TABLE deliveries
    -- When the delivering attempt started and how long it took; NULL on rows delivered by an
    -- older release (their delivering attempt is a delivery_attempts row) and on every row that
    -- is not delivered. Its status code is last_status_code, its number `attempts`.
    ADD COLUMN delivered_started_at timestamptz,
    ADD COLUMN delivered_latency_ms integer;

-- Every attempt of every delivery, wherever it is stored, for queries by hand. Filter it by
-- delivery_id (both halves are then index lookups); a join or a filter by broker alone reads
-- every delivered row. For a broker's recent failures read delivery_attempts itself.
CREATE VIEW delivery_attempt_history AS
SELECT delivery_id, broker_id, attempt, started_at, latency_ms, status_code, error_class,
       error_message, outcome
FROM delivery_attempts
UNION ALL
SELECT delivery_id, broker_id, attempts, delivered_started_at, delivered_latency_ms,
       last_status_code, NULL::text, NULL::text, 'delivered'::text
FROM deliveries
WHERE delivered_started_at IS NOT NULL;
