-- Transactional; required from this build on. `delivery_counts` also keeps the newest error a
-- delivery of the pair died with, so /brokers and `status` read a broker's newest dead-letter
-- error from the counter rows instead of probing `deliveries` (that probe's plan depended on the
-- statistics: with none taken while rows were dead, it walked other brokers' dead rows;
-- docs/performance.md "broker_statuses").
--
-- Meaning: the error of the newest death among the pair's deliveries, kept while the pair has
-- dead letters and cleared when it has none. Retention removes the oldest dead letters first,
-- so the newest death is the last to go; a replay of some dead letters may leave the error of
-- one now pending again, which is still the newest death of that broker.
--
-- Locks: ACCESS EXCLUSIVE on `delivery_counts` (a catalogue change: nullable columns, no
-- rewrite) until commit, so every claim and outcome write (their triggers write the counters)
-- waits for the rest of this transaction: the backfill below, one index probe per (partition,
-- broker) with dead letters (3 ms for 300 such pairs here: about a second per 100,000). The
-- shorter lock_timeout bounds the wait for the lock itself; if it gives up, nothing changed and
-- `migrate` is run again. The previous release keeps working on this schema: it reads neither column, and the
-- new trigger function keeps everything it does read as before.
SET LOCAL lock_timeout = '1s';
-- The backfill probes stay on deliveries_dead whatever the statistics say (as the service's
-- probes do: PROBE_PLAN_SETTINGS).
SET LOCAL enable_sort = off;
SET LOCAL jit = off;

ALTER TABLE delivery_counts
    ADD COLUMN last_dead_error text,
    ADD COLUMN last_dead_at    timestamptz;

-- As in migration 16, plus the newest death. A statement's rows are summed per pair: rows
-- leaving (old_rows) count -1 in their state, rows arriving (new_rows) +1, and the newest
-- retry error and the newest dead error among the arriving rows come along. Pairs are upserted
-- in key order, so two statements never lock counter rows in opposite orders.
CREATE OR REPLACE FUNCTION delivery_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO delivery_counts AS c
               (kafka_partition, broker_id, pending, dead, last_dead_error, last_dead_at)
        SELECT kafka_partition, broker_id,
               count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'dead'),
               (array_agg(last_error ORDER BY updated_at DESC)
                    FILTER (WHERE state = 'dead' AND last_error IS NOT NULL))[1],
               max(updated_at) FILTER (WHERE state = 'dead' AND last_error IS NOT NULL)
        FROM new_rows WHERE state IN ('pending', 'dead')
        GROUP BY kafka_partition, broker_id
        ORDER BY kafka_partition, broker_id
        ON CONFLICT (kafka_partition, broker_id) DO UPDATE SET
            pending = c.pending + EXCLUDED.pending,
            dead = c.dead + EXCLUDED.dead,
            last_dead_error = CASE WHEN EXCLUDED.last_dead_at >= c.last_dead_at OR c.last_dead_at IS NULL
                                   THEN COALESCE(EXCLUDED.last_dead_error, c.last_dead_error)
                                   ELSE c.last_dead_error END,
            last_dead_at = GREATEST(EXCLUDED.last_dead_at, c.last_dead_at);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO delivery_counts AS c (kafka_partition, broker_id, pending, dead)
        SELECT kafka_partition, broker_id,
               -count(*) FILTER (WHERE state = 'pending'), -count(*) FILTER (WHERE state = 'dead')
        FROM old_rows WHERE state IN ('pending', 'dead')
        GROUP BY kafka_partition, broker_id
        ORDER BY kafka_partition, broker_id
        ON CONFLICT (kafka_partition, broker_id) DO UPDATE SET
            pending = c.pending + EXCLUDED.pending,
            dead = c.dead + EXCLUDED.dead,
            last_error = CASE WHEN c.pending + EXCLUDED.pending = 0 THEN NULL ELSE c.last_error END,
            last_error_at = CASE WHEN c.pending + EXCLUDED.pending = 0 THEN NULL ELSE c.last_error_at END,
            last_dead_error = CASE WHEN c.dead + EXCLUDED.dead = 0 THEN NULL ELSE c.last_dead_error END,
            last_dead_at = CASE WHEN c.dead + EXCLUDED.dead = 0 THEN NULL ELSE c.last_dead_at END;
    ELSE
        INSERT INTO delivery_counts AS c
               (kafka_partition, broker_id, pending, dead, last_error, last_error_at,
                last_dead_error, last_dead_at)
        SELECT kafka_partition, broker_id, sum(pending), sum(dead),
               (array_agg(last_error ORDER BY retry_at DESC) FILTER (WHERE retry_at IS NOT NULL))[1],
               max(retry_at),
               (array_agg(last_error ORDER BY dead_at DESC) FILTER (WHERE dead_at IS NOT NULL))[1],
               max(dead_at)
        FROM (SELECT kafka_partition, broker_id,
                     (state = 'pending')::int AS pending, (state = 'dead')::int AS dead, last_error,
                     CASE WHEN state = 'pending' AND last_error IS NOT NULL THEN updated_at END AS retry_at,
                     CASE WHEN state = 'dead' AND last_error IS NOT NULL THEN updated_at END AS dead_at
              FROM new_rows WHERE state IN ('pending', 'dead')
              UNION ALL
              SELECT kafka_partition, broker_id,
                     -(state = 'pending')::int, -(state = 'dead')::int, NULL, NULL, NULL
              FROM old_rows WHERE state IN ('pending', 'dead')) AS moves
        GROUP BY kafka_partition, broker_id
        -- A retry that stays pending moves no count but brings a newer error.
        HAVING sum(pending) <> 0 OR sum(dead) <> 0 OR max(retry_at) IS NOT NULL OR max(dead_at) IS NOT NULL
        ORDER BY kafka_partition, broker_id
        ON CONFLICT (kafka_partition, broker_id) DO UPDATE SET
            pending = c.pending + EXCLUDED.pending,
            dead = c.dead + EXCLUDED.dead,
            last_error = CASE WHEN c.pending + EXCLUDED.pending = 0 THEN NULL
                              ELSE COALESCE(EXCLUDED.last_error, c.last_error) END,
            last_error_at = CASE WHEN c.pending + EXCLUDED.pending = 0 THEN NULL
                                 ELSE COALESCE(EXCLUDED.last_error_at, c.last_error_at) END,
            last_dead_error = CASE WHEN c.dead + EXCLUDED.dead = 0 THEN NULL
                                   WHEN EXCLUDED.last_dead_at >= c.last_dead_at OR c.last_dead_at IS NULL
                                   THEN COALESCE(EXCLUDED.last_dead_error, c.last_dead_error)
                                   ELSE c.last_dead_error END,
            last_dead_at = CASE WHEN c.dead + EXCLUDED.dead = 0 THEN NULL
                                ELSE GREATEST(EXCLUDED.last_dead_at, c.last_dead_at) END;
    END IF;
    RETURN NULL;
END
$$;

-- The pairs that have dead letters now: one backward probe of deliveries_dead (broker_id,
-- updated_at) per pair, which walks that broker's dead rows of other partitions until it meets
-- one of this partition. Exact: the ALTER above holds every counter write off until commit.
UPDATE delivery_counts c
SET last_dead_error = newest.last_error, last_dead_at = newest.updated_at
FROM delivery_counts p
CROSS JOIN LATERAL (SELECT d.last_error, d.updated_at FROM deliveries d
                    WHERE d.broker_id = p.broker_id AND d.state = 'dead'
                      AND d.kafka_partition = p.kafka_partition AND d.last_error IS NOT NULL
                    ORDER BY d.updated_at DESC LIMIT 1) newest
WHERE p.dead > 0
  AND c.kafka_partition = p.kafka_partition AND c.broker_id = p.broker_id;
