-- Loading a broker's pending deliveries walks them in offset order (see pending_for_broker):
-- an index in that order lets the LIMIT stop early instead of sorting all of a broker's backlog,
-- which matters exactly when a broker is failing and its backlog is large.
CREATE INDEX deliveries_pending_by_offset ON deliveries (broker_id, kafka_offset)
    WHERE state = 'pending';
DROP INDEX deliveries_pending;
