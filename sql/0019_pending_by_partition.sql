-- Online (built CONCURRENTLY, no lock that blocks reads or writes). A broker's ledger page
-- (`pending_for_broker`: its pending rows in the held partitions, in (partition, offset) order,
-- after a cursor) becomes one bounded range scan per partition: at most the page size of index
-- entries each, whatever the broker's pending depth. With only (broker_id, kafka_offset) the
-- page joined every pending row of the broker to its event and sorted them: 2.45 s for one page
-- of a broker with 168,000 pending rows on a 10-million-row ledger, 18 ms now
-- (docs/performance.md, "A broker's ledger page"). It replaces deliveries_pending_by_offset,
-- which nothing else reads, so a claimed delivery still enters the same number of indexes.
DROP INDEX CONCURRENTLY IF EXISTS deliveries_pending_by_partition;
CREATE INDEX CONCURRENTLY IF NOT EXISTS deliveries_pending_by_partition ON deliveries (broker_id, kafka_partition, kafka_offset)
    WHERE state = 'pending';
DROP INDEX CONCURRENTLY IF EXISTS deliveries_pending_by_offset;
