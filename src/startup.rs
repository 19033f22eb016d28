//! Wiring: builds the actors, starts the consumer, and shuts everything down in order.

use std::future::Future;

use actix::Actor;

use crate::actors::delivery::DeliveryDeps;
use crate::actors::delivery_supervisor::{DeliverySupervisor, DrainDeliveries};
use crate::actors::idempotency::IdempotencyActor;
use crate::actors::partition::PartitionDeps;
use crate::actors::partition_supervisor::{PartitionSupervisor, StopPartitions};
use crate::config::Settings;
use crate::kafka::{ConsumerError, KafkaConsumer};
use crate::lease::LeaseBook;
use crate::ledger::{Ledger, LedgerError};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("could not prepare the ledger database")]
    Ledger(#[from] LedgerError),
    #[error("could not start consuming from Kafka")]
    Kafka(#[from] ConsumerError),
}

pub struct Application {
    settings: Settings,
    ledger: Ledger,
    instance_id: String,
}

impl Application {
    /// Connects to Postgres and applies pending migrations.
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        let ledger = Ledger::connect_lazy(&settings.postgres.url, settings.postgres.pool_size)?;
        let applied = ledger.migrate().await?;
        if !applied.is_empty() {
            tracing::info!(versions = ?applied, "ledger migrations applied");
        }
        Ok(Application {
            settings,
            ledger,
            instance_id: instance_id(),
        })
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Runs until `shutdown` resolves, then stops in order: stop reading partitions (each
    /// finishes its batch and stores its offset), let in-flight webhooks finish within
    /// `shutdown.drain_timeout_ms`, commit offsets and leave the group. Must run inside an actix
    /// System.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartupError> {
        let Application {
            settings,
            ledger,
            instance_id,
        } = self;
        let leases = LeaseBook::default();
        let ledger = IdempotencyActor::new(ledger).start();
        let deliveries = DeliverySupervisor::new(DeliveryDeps {
            ledger: ledger.clone(),
            leases: leases.clone(),
            settings: settings.delivery.clone(),
            retry: settings.retry.policy(),
            breaker: settings.circuit_breaker.breaker_config(),
        })
        .start();
        let partitions = PartitionSupervisor::new(PartitionDeps {
            topic: settings.kafka.topic.clone(),
            ledger,
            deliveries: deliveries.clone(),
            leases,
            instance_id: instance_id.clone(),
            lease: settings.postgres.lease(),
            request_timeout: settings.delivery.request_timeout(),
            max_message_bytes: settings.delivery.max_message_bytes,
            max_batch_messages: settings.kafka.max_batch_messages,
        })
        .start();
        let consumer = KafkaConsumer::start(&settings.kafka, partitions.clone())?;
        tracing::info!(
            instance_id = %instance_id,
            topic = %settings.kafka.topic,
            group_id = %settings.kafka.group_id,
            "webhook-delivery started"
        );

        shutdown.await;
        tracing::info!(instance_id = %instance_id, "shutting down: finishing current batches");
        let _ = tokio::time::timeout(
            settings.kafka.revoke_drain_timeout(),
            partitions.send(StopPartitions),
        )
        .await;
        let drained = deliveries
            .send(DrainDeliveries {
                timeout: settings.shutdown.drain_timeout(),
            })
            .await
            .unwrap_or(false);
        if !drained {
            tracing::warn!(
                "in-flight webhooks did not finish within shutdown.drain_timeout_ms; they stay pending and will be sent again"
            );
        }
        let _ = actix_rt::task::spawn_blocking(move || consumer.shutdown()).await;
        tracing::info!(instance_id = %instance_id, "stopped");
        Ok(())
    }
}

/// Identifies this process in partition leases: the pod name when there is one, plus a random
/// suffix so a restarted pod never mistakes its predecessor's lease for its own.
fn instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}
