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
const ADMIN_DB_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

pub struct World {
    pub db_name: String,
    pub db_url: String,
    pub topic: String,
    pub group_id: String,
}

impl World {
    /// `label` is unique per run, e.g. `1764_healthy_service`.
    pub async fn create(label: &str, partitions: i32) -> Result<World, BenchError> {
        let db_name = format!("wd_bench_{label}");
        let admin = admin_db().await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {db_name}"))
            .await
            .map_err(|e| BenchError::postgres(format!("creating database {db_name}"), e))?;
        let db_url = format!("postgres://postgres@127.0.0.1:5432/{db_name}");
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
        match admin_db().await {
            Ok(admin) => {
                let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db_name);
                if let Err(error) = admin.batch_execute(&sql).await {
                    eprintln!("bench: could not drop {}: {error}", self.db_name);
                }
            }
            Err(error) => eprintln!("bench: could not drop {}: {error}", self.db_name),
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

pub fn broker_id(index: usize) -> String {
    format!("bench-broker-{index:03}")
}

async fn admin_db() -> Result<tokio_postgres::Client, BenchError> {
    let (client, connection) = tokio_postgres::connect(ADMIN_DB_URL, NoTls)
        .await
        .map_err(|e| {
            BenchError::postgres("connecting to 127.0.0.1:5432 (scripts/services.sh)", e)
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
