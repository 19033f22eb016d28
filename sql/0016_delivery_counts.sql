-- Pending and dead deliveries per (partition, broker), kept exact by statement-level triggers on
-- `deliveries`, so the gauges, /brokers and the sweep read a few rows per broker instead of
-- counting the backlog (docs/decisions.md, "Maintained delivery counts"). Every write path fires
-- them: claims, outcome writes, replays, backfill, manual SQL, a retention cleaner that DELETEs.
-- (Dropping or detaching a table partition fires no trigger: whoever does that must subtract
-- the dropped rows in the same transaction.)
--
-- Keyed by partition first: in steady state only the instance that owns a partition writes its
-- rows (claims and outcome writes both follow partition ownership), so pods never contend on a
-- row, and the sweep reads its own partitions as one index range.
CREATE TABLE delivery_counts (
    kafka_partition integer NOT NULL,
    broker_id       text NOT NULL,
    pending         bigint NOT NULL DEFAULT 0,
    dead            bigint NOT NULL DEFAULT 0,
    -- The newest error an outcome write left on a delivery of this pair that is still pending
    -- (a retry); cleared when nothing of the pair is pending. /brokers reads dead rows' errors
    -- from the rows themselves (one probe of deliveries_dead per broker).
    last_error      text,
    last_error_at   timestamptz,
    PRIMARY KEY (kafka_partition, broker_id)
);

-- One function for the three events: the statement's rows leaving (old_rows) count -1 in their
-- state, the rows arriving (new_rows) +1, summed per pair, so an UPDATE that moves a row from
-- pending to delivered, a replay from dead to pending, or a change of broker_id are all right.
-- Pairs are upserted in key order, so two statements never lock counter rows in opposite orders.
CREATE FUNCTION delivery_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO delivery_counts AS c (kafka_partition, broker_id, pending, dead)
        SELECT kafka_partition, broker_id,
               count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'dead')
        FROM new_rows WHERE state IN ('pending', 'dead')
        GROUP BY kafka_partition, broker_id
        ORDER BY kafka_partition, broker_id
        ON CONFLICT (kafka_partition, broker_id) DO UPDATE
            SET pending = c.pending + EXCLUDED.pending, dead = c.dead + EXCLUDED.dead;
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
            last_error_at = CASE WHEN c.pending + EXCLUDED.pending = 0 THEN NULL ELSE c.last_error_at END;
    ELSE
        INSERT INTO delivery_counts AS c (kafka_partition, broker_id, pending, dead, last_error, last_error_at)
        SELECT COALESCE(delta.kafka_partition, e.kafka_partition), COALESCE(delta.broker_id, e.broker_id),
               COALESCE(delta.pending, 0), COALESCE(delta.dead, 0), e.last_error, e.updated_at
        FROM (SELECT kafka_partition, broker_id, sum(pending) AS pending, sum(dead) AS dead
              FROM (SELECT kafka_partition, broker_id,
                           (state = 'pending')::int AS pending, (state = 'dead')::int AS dead
                    FROM new_rows WHERE state IN ('pending', 'dead')
                    UNION ALL
                    SELECT kafka_partition, broker_id,
                           -(state = 'pending')::int, -(state = 'dead')::int
                    FROM old_rows WHERE state IN ('pending', 'dead')) AS moves
              GROUP BY kafka_partition, broker_id
              HAVING sum(pending) <> 0 OR sum(dead) <> 0) delta
        FULL JOIN (SELECT DISTINCT ON (kafka_partition, broker_id)
                          kafka_partition, broker_id, last_error, updated_at
                   FROM new_rows
                   WHERE state = 'pending' AND last_error IS NOT NULL
                   ORDER BY kafka_partition, broker_id, updated_at DESC) e
               ON e.kafka_partition = delta.kafka_partition AND e.broker_id = delta.broker_id
        ORDER BY 1, 2
        ON CONFLICT (kafka_partition, broker_id) DO UPDATE SET
            pending = c.pending + EXCLUDED.pending,
            dead = c.dead + EXCLUDED.dead,
            last_error = CASE WHEN c.pending + EXCLUDED.pending = 0 THEN NULL
                              ELSE COALESCE(EXCLUDED.last_error, c.last_error) END,
            last_error_at = CASE WHEN c.pending + EXCLUDED.pending = 0 THEN NULL
                                 ELSE COALESCE(EXCLUDED.last_error_at, c.last_error_at) END;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION delivery_counts_clear() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM delivery_counts;
    RETURN NULL;
END
$$;

-- From here to the end of the transaction claims and outcome writes wait (SHARE ROW EXCLUSIVE on
-- deliveries): no write can fall between the triggers taking over and the initial count below,
-- so the count is exact. It reads only pending and dead rows (through their partial indexes);
-- docs/migrations.md says how long that takes on a large ledger. Pending errors are not copied:
-- /brokers shows a pair's error again from its next failed attempt.
LOCK TABLE deliveries IN SHARE ROW EXCLUSIVE MODE;
CREATE TRIGGER delivery_counts_insert AFTER INSERT ON deliveries
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION delivery_counts_apply();
CREATE TRIGGER delivery_counts_update AFTER UPDATE ON deliveries
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION delivery_counts_apply();
CREATE TRIGGER delivery_counts_delete AFTER DELETE ON deliveries
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION delivery_counts_apply();
CREATE TRIGGER delivery_counts_truncate AFTER TRUNCATE ON deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION delivery_counts_clear();

INSERT INTO delivery_counts (kafka_partition, broker_id, pending, dead)
SELECT kafka_partition, broker_id, sum(pending), sum(dead)
FROM (SELECT kafka_partition, broker_id, count(*) AS pending, 0 AS dead
      FROM deliveries WHERE state = 'pending' GROUP BY kafka_partition, broker_id
      UNION ALL
      SELECT kafka_partition, broker_id, 0, count(*)
      FROM deliveries WHERE state = 'dead' GROUP BY kafka_partition, broker_id) counted
GROUP BY kafka_partition, broker_id;
