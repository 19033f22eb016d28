-- The last circuit-breaker transition of each broker, written by whichever instance saw it, so
-- that `webhook-delivery status` and the admin API can show breaker state without asking a
-- running instance. Each instance keeps its own breaker per broker; this is the latest word.
CREATE TABLE broker_circuits (
    broker_id            text PRIMARY KEY,
    state                text NOT NULL CHECK (state IN ('closed', 'open', 'half_open')),
    since                timestamptz NOT NULL,
    consecutive_failures integer NOT NULL,
    open_until           timestamptz,
    reason               text NOT NULL,
    instance_id          text NOT NULL
);

-- Incident reports scan attempts by time and by outcome.
CREATE INDEX delivery_attempts_delivered ON delivery_attempts (broker_id, started_at)
    WHERE outcome = 'delivered';
CREATE INDEX events_by_event_id ON events (event_id);
CREATE INDEX deliveries_dead ON deliveries (broker_id, updated_at) WHERE state = 'dead';
