//! The isolated world of one run: a fresh database `wd_bench_<run>` with the ledger schema,
//! a fresh topic and consumer group, and the brokers and subscriptions of the scenario.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use tokio_postgres::NoTls;
use webhook_delivery::ledger::Ledger;

use crate::error::BenchError;
use crate::event::{load_id, WARMUP_LOAD};

pub const KAFKA: &str = "127.0.0.1:9092";
/// The server scripts/services.sh brings up (trust auth, user postgres, a database `test`).
pub const POSTGRES: &str = "127.0.0.1:5432";
const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

pub struct World {
    /// host:port of the Postgres server.
    pub server: String,
    pub db_name: String,
    pub db_url: String,
    pub topic: String,
    pub group_id: String,
}

impl World {
    /// `label` is unique per run, e.g. `1764_healthy_service`; `server` is Postgres' host:port.
    pub async fn create(label: &str, partitions: i32, server: &str) -> Result<World, BenchError> {
        let db_name = format!("wd_bench_{label}");
        let admin = admin_db(server).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {db_name}"))
            .await
            .map_err(|e| BenchError::postgres(format!("creating database {db_name}"), e))?;
        let db_url = format!("postgres://postgres@{server}/{db_name}");
        Ledger::connect_lazy(&db_url, 1)?.migrate().await?;

        let topic = format!("wd-bench-{}", label.replace('_', "-"));
        let results = kafka_admin()?
            .create_topics(
                &[NewTopic::new(
                    &topic,
                    partitions,
                    TopicReplication::Fixed(1),
                )],
                &AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)),
            )
            .await
            .map_err(|e| BenchError::kafka(format!("creating topic {topic}"), e))?;
        for result in results {
            result.map_err(|(name, code)| {
                BenchError::kafka(
                    format!("creating topic {name}"),
                    rdkafka::error::KafkaError::AdminOp(code),
                )
            })?;
        }
        Ok(World {
            server: server.to_owned(),
            group_id: format!("{topic}-group"),
            db_name,
            db_url,
            topic,
        })
    }

    /// Inserts the brokers (`urls[i]` is broker i's endpoint) and their subscriptions
    /// (`(broker index, load)` pairs). The last broker is the warm-up broker and follows only
    /// the warm-up load.
    pub async fn seed(
        &self,
        urls: &[String],
        subscriptions: &[(u16, u32)],
    ) -> Result<(), BenchError> {
        let (db, connection) = tokio_postgres::connect(&self.db_url, NoTls)
            .await
            .map_err(|e| BenchError::postgres("connecting to the bench database", e))?;
        let connection = tokio::spawn(connection);
        let ids: Vec<String> = (0..urls.len()).map(broker_id).collect();
        let secrets = vec![SIGNING_SECRET; urls.len()];
        db.execute(
            "INSERT INTO brokers (broker_id, webhook_url, signing_secret)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[])",
            &[&ids, &urls, &secrets],
        )
        .await
        .map_err(|e| BenchError::postgres("seeding brokers", e))?;
        let mut broker_ids: Vec<&str> = Vec::with_capacity(subscriptions.len() + 1);
        let mut load_ids: Vec<String> = Vec::with_capacity(subscriptions.len() + 1);
        for &(broker, load) in subscriptions {
            broker_ids.push(&ids[broker as usize]);
            load_ids.push(load_id(load));
        }
        if let Some(warmup) = ids.last() {
            broker_ids.push(warmup);
            load_ids.push(WARMUP_LOAD.to_owned());
        }
        db.execute(
            "INSERT INTO broker_subscriptions (broker_id, load_id)
             SELECT * FROM unnest($1::text[], $2::text[])",
            &[&broker_ids, &load_ids],
        )
        .await
        .map_err(|e| BenchError::postgres("seeding subscriptions", e))?;
        drop(db);
        let _ = connection.await;
        Ok(())
    }

    /// Writes a ledger history before the system starts: `shape.rows` delivered deliveries
    /// (rounded down to whole events), each with its attempt, and their events, spread over the
    /// last 6 days, in chunks of generate_series (seconds per million rows, not a client loop).
    /// The rows look like the run's own: the scenario's brokers and loads, idempotency keys of
    /// the same form (`evt:ev-<16 hex digits>-<n>-h`, the hex digits from md5, so they land all
    /// over the key index like the run's ids and a producer's random ids), the same payload size. Then VACUUM
    /// ANALYZE (a production ledger is vacuumed and has statistics) and a CHECKPOINT, so the run
    /// is not charged for writing out the history. Returns how many deliveries were written.
    pub async fn write_history(&self, shape: &History<'_>) -> Result<u64, BenchError> {
        const EVENTS_PER_STATEMENT: i64 = 200_000;
        let (db, connection) = tokio_postgres::connect(&self.db_url, NoTls)
            .await
            .map_err(|e| BenchError::postgres("connecting to the bench database", e))?;
        let connection = tokio::spawn(connection);
        let per_load = i64::from(shape.per_load.max(1));
        let events = i64::try_from(shape.rows).unwrap_or(i64::MAX) / per_load;
        db.batch_execute("SET synchronous_commit = off")
            .await
            .map_err(|e| BenchError::postgres("preparing the history session", e))?;
        let statement = db
            .prepare(HISTORY_SQL)
            .await
            .map_err(|e| BenchError::postgres("preparing the history insert", e))?;
        let started = std::time::Instant::now();
        let mut from = 0i64;
        while from < events {
            let to = (from + EVENTS_PER_STATEMENT).min(events);
            db.execute(
                &statement,
                &[
                    &from,
                    &to,
                    &events,
                    &i64::from(shape.loads),
                    &per_load,
                    &i64::from(shape.stride),
                    &i64::from(shape.brokers),
                    &format!("{}-history", self.topic),
                    &shape.payload,
                    &shape.partitions,
                ],
            )
            .await
            .map_err(|e| BenchError::postgres("writing the ledger history", e))?;
            from = to;
            eprintln!(
                "bench:   ledger history: {} of {} deliveries written ({:.0} s)",
                from * per_load,
                events * per_load,
                started.elapsed().as_secs_f64()
            );
        }
        // One statement per call: several in one simple query form a transaction block,
        // which VACUUM refuses.
        for sql in [
            "VACUUM (ANALYZE) events, deliveries, delivery_attempts",
            "CHECKPOINT",
        ] {
            db.batch_execute(sql)
                .await
                .map_err(|e| BenchError::postgres(format!("after the ledger history: {sql}"), e))?;
        }
        drop(db);
        let _ = connection.await;
        Ok(u64::try_from(events * per_load).unwrap_or(0))
    }

    /// (pending deliveries, pending deliveries of its deepest load) of one broker.
    pub async fn pending_depth(&self, broker_id: &str) -> Result<(u64, u64), BenchError> {
        let (db, connection) = tokio_postgres::connect(&self.db_url, NoTls)
            .await
            .map_err(|e| BenchError::postgres("connecting to the bench database", e))?;
        let connection = tokio::spawn(connection);
        let row = db
            .query_one(
                "SELECT coalesce(sum(n), 0)::int8, coalesce(max(n), 0)::int8 FROM (
                     SELECT count(*) AS n FROM deliveries
                     WHERE broker_id = $1 AND state = 'pending' GROUP BY load_id
                 ) per_load",
                &[&broker_id],
            )
            .await
            .map_err(|e| BenchError::postgres("counting a broker's pending deliveries", e))?;
        drop(db);
        let _ = connection.await;
        let count = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        Ok((count(0), count(1)))
    }

    /// Deliveries the service's ledger still holds as not delivered, for these brokers.
    pub async fn undelivered(&self, broker_ids: &[String]) -> Result<u64, BenchError> {
        let (db, connection) = tokio_postgres::connect(&self.db_url, NoTls)
            .await
            .map_err(|e| BenchError::postgres("connecting to the bench database", e))?;
        let connection = tokio::spawn(connection);
        let count: i64 = db
            .query_one(
                "SELECT count(*) FROM deliveries WHERE state <> 'delivered' AND broker_id = ANY($1)",
                &[&broker_ids],
            )
            .await
            .map_err(|e| BenchError::postgres("counting undelivered deliveries", e))?
            .get(0);
        drop(db);
        let _ = connection.await;
        Ok(count.max(0) as u64)
    }

    /// Drops the database and deletes the topic. Best effort: a leftover only costs space.
    pub async fn teardown(self) {
        // `BENCH_KEEP_DATABASE=1` keeps the database (not the topic), to look at the ledger a
        // run left (query plans at `growth`'s size, docs/performance.md); drop it by hand.
        if std::env::var_os("BENCH_KEEP_DATABASE").is_some_and(|v| v == "1") {
            eprintln!(
                "bench: kept database {} (BENCH_KEEP_DATABASE=1)",
                self.db_name
            );
        } else {
            match admin_db(&self.server).await {
                Ok(admin) => {
                    let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db_name);
                    if let Err(error) = admin.batch_execute(&sql).await {
                        eprintln!("bench: could not drop {}: {error}", self.db_name);
                    }
                }
                Err(error) => eprintln!("bench: could not drop {}: {error}", self.db_name),
            }
        }
        if let Ok(admin) = kafka_admin() {
            let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
            let deleted =
                tokio::time::timeout(ADMIN_TIMEOUT, admin.delete_topics(&[&self.topic], &options))
                    .await;
            if !matches!(deleted, Ok(Ok(_))) {
                eprintln!("bench: could not delete topic {}", self.topic);
            }
        }
    }
}

/// The shape of a ledger history: how many delivered rows, over which brokers and loads.
pub struct History<'a> {
    /// Delivered deliveries to write.
    pub rows: u64,
    pub brokers: u32,
    pub loads: u32,
    /// Subscribers per load, and the stride between them (`Scenario::subscribers`).
    pub per_load: u32,
    pub stride: u32,
    pub partitions: i32,
    /// Every history event's payload (a bench event of the usual size).
    pub payload: &'a [u8],
}

/// One chunk of history: events $1..$2 of $3, each delivered to its load's subscribers
/// (load = event % loads, subscriber k = (load + k * stride) % brokers) at its first attempt,
/// which this build keeps on the delivery's row (migration 20). Names follow `broker_id` and
/// `crate::event::load_id`.
const HISTORY_SQL: &str = "
WITH numbered AS (
    SELECT g,
           'ev-' || left(md5(g::text), 16) || '-' || g || '-h' AS id,
           g % $4::int8 AS load,
           now() - interval '6 days' + (g::float8 / $3::int8) * interval '6 days' AS at
    FROM generate_series($1::int8, $2::int8 - 1) g
),
new_events AS (
    INSERT INTO events (idempotency_key, event_id, load_id, status, topic, kafka_partition,
                        kafka_offset, payload, consumed_at)
    SELECT 'evt:' || id, id,
           'load-' || lpad(load::text, greatest(5, length(load::text)), '0'),
           'delivered', $8::text, (g % $10::int4)::int4, g / $10::int4, $9::bytea, at
    FROM numbered
),
new_deliveries AS (
    INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition, kafka_offset,
                            state, attempts, next_attempt_at, created_at, updated_at, delivered_at,
                            last_status_code, delivered_started_at, delivered_latency_ms)
    SELECT 'evt:' || id,
           'bench-broker-' || lpad(b::text, greatest(3, length(b::text)), '0'),
           'load-' || lpad(load::text, greatest(5, length(load::text)), '0'),
           (g % $10::int4)::int4, g / $10::int4, 'delivered', 1, at, at,
           at + interval '20 milliseconds', at + interval '20 milliseconds',
           200, at + interval '15 milliseconds', 5
    FROM numbered
    CROSS JOIN generate_series(0, $5::int8 - 1) k
    CROSS JOIN LATERAL (SELECT (load + k * $6::int8) % $7::int8 AS b) subscriber
    RETURNING 1
)
SELECT count(*) FROM new_deliveries";

pub fn broker_id(index: usize) -> String {
    format!("bench-broker-{index:03}")
}

async fn admin_db(server: &str) -> Result<tokio_postgres::Client, BenchError> {
    let url = format!("postgres://postgres@{server}/test");
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.map_err(|e| {
        BenchError::postgres(
            format!("connecting to {url} (scripts/services.sh for {POSTGRES})"),
            e,
        )
    })?;
    tokio::spawn(connection);
    Ok(client)
}

fn kafka_admin() -> Result<AdminClient<DefaultClientContext>, BenchError> {
    ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .create()
        .map_err(|e| BenchError::kafka("creating the admin client", e))
}
