//! The Kafka side: consumer configuration, the rebalance callbacks, and the thread that polls the
//! consumer's main queue. Each assigned partition's messages are split into their own queue and
//! handed to a PartitionActor, so one partition can never hold up another.
//!
//! The consumer is polled on its own OS thread because revocation blocks the rebalance callback
//! until the revoked PartitionActors have finished their current batch (bounded by
//! `kafka.revoke_drain_timeout_ms`), and those actors run on the actix thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::Addr;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{ClientContext, Message, TopicPartitionList};
use tokio::sync::oneshot;

use crate::actors::partition_supervisor::{
    PartitionSupervisor, PartitionsAssigned, PartitionsRevoked, StrayMessage,
};
use crate::admin::Health;
use crate::config::KafkaSettings;

pub type EventConsumer = StreamConsumer<RebalanceContext>;
pub type PartitionQueue = StreamPartitionQueue<RebalanceContext>;

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("could not create the Kafka consumer")]
    Create(#[source] KafkaError),
    #[error("could not subscribe to topic `{topic}`")]
    Subscribe {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("the Kafka consumer thread could not be started")]
    Thread(#[source] std::io::Error),
    #[error("the Kafka consumer thread exited during start-up")]
    ThreadDied,
}

/// librdkafka properties: the platform team's pass-through table first, then what correctness
/// needs (we store offsets ourselves, only after the ledger commit; docs/design.md 2).
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000");
    for (key, value) in &settings.client {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group_id)
        .set("enable.auto.offset.store", "false")
        .set(
            "session.timeout.ms",
            settings.session_timeout_ms.to_string(),
        )
        .set(
            "max.poll.interval.ms",
            settings.max_poll_interval_ms.to_string(),
        );
    config
}

pub struct RebalanceContext {
    topic: String,
    consumer: OnceLock<Weak<EventConsumer>>,
    partitions: Addr<PartitionSupervisor>,
    revoke_drain_timeout: Duration,
    closing: AtomicBool,
    health: Health,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let partitions = self.partitions_of(list);
        tracing::info!(topic = %self.topic, partitions = ?partitions, "partitions revoked");
        if partitions.is_empty() || self.closing.load(Ordering::SeqCst) {
            return;
        }
        // Let the revoked PartitionActors finish their batch and store their offsets first.
        let (done, finished) = std::sync::mpsc::channel();
        let asked = self
            .partitions
            .try_send(PartitionsRevoked {
                partitions: partitions.clone(),
                done,
            })
            .is_ok();
        if asked && finished.recv_timeout(self.revoke_drain_timeout).is_err() {
            tracing::warn!(
                topic = %self.topic,
                partitions = ?partitions,
                timeout_ms = self.revoke_drain_timeout.as_millis() as u64,
                "revoked partitions did not finish in time; the next owner redoes their last batch"
            );
        }
        if let Err(error) = base.commit_consumer_state(CommitMode::Sync) {
            tracing::warn!(topic = %self.topic, error.message = %error, "offset commit on revoke failed");
        }
    }

    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(list) = rebalance else {
            if let Rebalance::Error(error) = rebalance {
                tracing::error!(topic = %self.topic, error.message = %error, "rebalance failed");
            }
            return;
        };
        let partitions = self.partitions_of(list);
        tracing::info!(topic = %self.topic, partitions = ?partitions, "partitions assigned");
        // Even an empty assignment means we are a member of the group.
        self.health.mark_joined();
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        // Split right away, before the first fetch lands on the main queue.
        let queues = partitions
            .iter()
            .filter_map(|&partition| {
                consumer
                    .split_partition_queue(&self.topic, partition)
                    .map(|queue| (partition, queue))
            })
            .collect();
        self.partitions
            .do_send(PartitionsAssigned { consumer, queues });
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                tracing::debug!(topic = %self.topic, offsets = ?offsets.to_topic_map(), "offsets committed")
            }
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => {
                tracing::warn!(topic = %self.topic, error.message = %error, "offset commit failed")
            }
        }
    }
}

impl RebalanceContext {
    fn partitions_of(&self, list: &TopicPartitionList) -> Vec<i32> {
        let mut partitions: Vec<i32> = list
            .elements_for_topic(&self.topic)
            .iter()
            .map(|element| element.partition())
            .collect();
        partitions.sort_unstable();
        partitions
    }
}

/// The running consumer thread. `shutdown` commits the stored offsets and leaves the group.
pub struct KafkaConsumer {
    consumer: Arc<EventConsumer>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KafkaConsumer {
    pub fn start(
        settings: &KafkaSettings,
        partitions: Addr<PartitionSupervisor>,
        health: Health,
    ) -> Result<KafkaConsumer, ConsumerError> {
        let config = client_config(settings);
        let topic = settings.topic.clone();
        let revoke_drain_timeout = settings.revoke_drain_timeout();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("kafka-consumer".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready_tx.send(Err(ConsumerError::Thread(error)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let context = RebalanceContext {
                        topic: topic.clone(),
                        consumer: OnceLock::new(),
                        partitions: partitions.clone(),
                        revoke_drain_timeout,
                        closing: AtomicBool::new(false),
                        health,
                    };
                    let consumer: Arc<EventConsumer> = match config.create_with_context(context) {
                        Ok(consumer) => Arc::new(consumer),
                        Err(error) => {
                            let _ = ready_tx.send(Err(ConsumerError::Create(error)));
                            return;
                        }
                    };
                    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
                    if let Err(source) = consumer.subscribe(&[topic.as_str()]) {
                        let _ = ready_tx.send(Err(ConsumerError::Subscribe {
                            topic: topic.clone(),
                            source,
                        }));
                        return;
                    }
                    let _ = ready_tx.send(Ok(consumer.clone()));
                    poll_main_queue(&consumer, &partitions, stop_rx).await;
                    close(consumer).await;
                });
            })
            .map_err(ConsumerError::Thread)?;
        let consumer = ready_rx.recv().map_err(|_| ConsumerError::ThreadDied)??;
        Ok(KafkaConsumer {
            consumer,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn consumer(&self) -> &Arc<EventConsumer> {
        &self.consumer
    }

    /// Stops polling, commits stored offsets synchronously and leaves the group. Blocks until
    /// the consumer thread has exited; call it from a blocking context.
    pub fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let KafkaConsumer {
            consumer, thread, ..
        } = self;
        drop(consumer);
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// Serves rebalances and other events. With every partition split off, messages only show up
/// here in the instant between an assignment and its split; they are passed on, not dropped.
async fn poll_main_queue(
    consumer: &EventConsumer,
    partitions: &Addr<PartitionSupervisor>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            received = consumer.recv() => match received {
                Ok(message) => {
                    tracing::warn!(
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        "message arrived on the main queue; passing it to its partition"
                    );
                    partitions.do_send(StrayMessage(message.detach()));
                }
                Err(error) => {
                    tracing::warn!(error.message = %error, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn close(consumer: Arc<EventConsumer>) {
    consumer.context().closing.store(true, Ordering::SeqCst);
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::info!(error.message = %error, "final offset commit skipped");
    }
    // Partition queues hold the consumer too; wait briefly for their actors to drop them so
    // that closing (LeaveGroup) happens here, on this thread.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&consumer) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(consumer);
    tracing::info!("kafka consumer closed");
}
