-- A claim looks up, per new delivery, the newest earlier pending delivery of the same (broker,
-- load). With the offset in the index that is one index probe instead of visiting every pending
-- row of the load.
CREATE INDEX deliveries_pending_by_load ON deliveries (broker_id, load_id, kafka_offset)
    WHERE state = 'pending';
DROP INDEX deliveries_by_load;
