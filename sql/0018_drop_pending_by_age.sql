-- Online (DROP INDEX CONCURRENTLY, no lock that blocks reads or writes). The oldest-pending gauge
-- and /brokers now take their age from the earliest-due pending row of each (broker, partition)
-- through deliveries_pending_due (migration 17), the index the ledger sweep already probes, so
-- this second partial index no longer pays for itself: it cost one entry per claimed delivery
-- and per retry, about a fifth of the claim's Postgres time (docs/decisions.md 16,
-- docs/performance.md "Index writes per delivery").
DROP INDEX CONCURRENTLY IF EXISTS deliveries_pending_by_age;
