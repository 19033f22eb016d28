-- The delivery ledger. `webhook-delivery migrate` creates these tables (`serve` runs no DDL).
-- brokers and broker_subscriptions are written by other systems; the service only reads them,
-- except that a 410 Gone answer disables a broker (enabled = false, disabled_reason set).

CREATE TABLE IF NOT EXISTS brokers (
    broker_id       text PRIMARY KEY,
    webhook_url     text NOT NULL,
    -- One or more `whsec_...` secrets separated by spaces: during a rotation both are active and
    -- each webhook carries one signature per secret.
    signing_secret  text NOT NULL,
    enabled         boolean NOT NULL DEFAULT true,
    disabled_reason text
);

CREATE TABLE IF NOT EXISTS broker_subscriptions (
    broker_id text NOT NULL REFERENCES brokers (broker_id) ON DELETE CASCADE,
    load_id   text NOT NULL,
    PRIMARY KEY (broker_id, load_id)
);
CREATE INDEX IF NOT EXISTS broker_subscriptions_by_load ON broker_subscriptions (load_id);

-- One row per distinct event (idempotency key). payload is the Kafka value exactly as consumed.
CREATE TABLE events (
    idempotency_key text PRIMARY KEY,
    event_id        text,
    load_id         text NOT NULL,
    status          text NOT NULL,
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    payload         bytea NOT NULL,
    consumed_at     timestamptz NOT NULL DEFAULT now()
);

-- One row per (event, broker): the unit of delivery, retry and dead-lettering. The unique key is
-- what makes a redelivered or re-produced event harmless (INSERT ... ON CONFLICT DO NOTHING).
CREATE TABLE deliveries (
    delivery_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    idempotency_key  text NOT NULL,
    broker_id        text NOT NULL,
    load_id          text NOT NULL,
    -- Where the event came from: the owner of this partition owns the delivery (docs/design.md 3),
    -- and the offset orders a load's deliveries (docs/design.md 4).
    kafka_partition  integer NOT NULL,
    kafka_offset     bigint NOT NULL,
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_status_code integer,
    last_error       text,
    dead_reason      text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    UNIQUE (idempotency_key, broker_id)
);
CREATE INDEX deliveries_pending ON deliveries (broker_id, kafka_partition, kafka_offset)
    WHERE state = 'pending';
CREATE INDEX deliveries_pending_due ON deliveries (kafka_partition, next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX deliveries_by_load ON deliveries (broker_id, load_id) WHERE state = 'pending';

-- Every HTTP attempt (or decision not to send), for diagnosis and incident reports.
CREATE TABLE delivery_attempts (
    attempt_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id   bigint NOT NULL,
    broker_id     text NOT NULL,
    attempt       integer NOT NULL,
    started_at    timestamptz NOT NULL,
    latency_ms    integer NOT NULL,
    status_code   integer,
    error_class   text,
    error_message text,
    outcome       text NOT NULL CHECK (outcome IN ('delivered', 'retry', 'dead'))
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id);
CREATE INDEX delivery_attempts_by_time ON delivery_attempts (started_at);

-- Messages that are not valid events (poison). Their offsets advance; they are kept here.
CREATE TABLE rejected_messages (
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    message_key     bytea,
    -- The value, capped; value_bytes is the full size.
    raw_value       bytea,
    value_bytes     integer NOT NULL,
    error           text NOT NULL,
    rejected_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, kafka_partition, kafka_offset)
);

-- Which instance may send a partition's deliveries right now (docs/design.md 3).
CREATE TABLE partition_leases (
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    owner_id        text NOT NULL,
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (topic, kafka_partition)
);
