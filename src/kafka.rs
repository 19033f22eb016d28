//! The Kafka side: consumer configuration, the rebalance callbacks, and the thread that polls the
//! consumer's main queue. Each assigned partition's messages get their own queue, split off
//! before the assignment takes effect, so one partition can never hold up another and no message
//! ever lands on the main queue.
//!
//! This module knows nothing about actors: rebalances leave it as [`RebalanceEvent`]s on an
//! unbounded channel that the partition side (src/actors/partition_supervisor) consumes.
//!
//! The consumer is polled on its own OS thread because a revocation blocks the rebalance callback
//! until the revoked partitions have finished their current batch (bounded by
//! `kafka.revoke_drain_timeout_ms`), and that work runs on the actix thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::oneshot;

use crate::admin::Health;
use crate::config::KafkaSettings;

pub type EventConsumer = StreamConsumer<RebalanceContext>;
pub type PartitionQueue = StreamPartitionQueue<RebalanceContext>;

/// How long the rebalance callback waits beyond `kafka.revoke_drain_timeout_ms` for the partition
/// side to confirm a revocation. The partition side enforces the drain deadline itself; this
/// only keeps the consumer alive if the actix thread is wedged.
const REVOKE_CONFIRM_GRACE: Duration = Duration::from_secs(5);

/// What a rebalance means for the partition side, in the order it happened.
pub enum RebalanceEvent {
    /// These partitions are ours now. Each queue was split off before the assignment started
    /// fetching, so every message of the partition arrives on its queue, in offset order.
    Assigned {
        consumer: Arc<EventConsumer>,
        queues: Vec<(i32, PartitionQueue)>,
    },
    /// These partitions are being taken away. The rebalance callback blocks until `drained` is
    /// signalled (the partition side gives up waiting after `kafka.revoke_drain_timeout_ms`),
    /// then commits the stored offsets.
    Revoked {
        partitions: Vec<i32>,
        drained: std::sync::mpsc::Sender<()>,
    },
}

/// The partition side's end of the rebalance channel.
pub type RebalanceEvents = UnboundedReceiver<RebalanceEvent>;

/// Creates the rebalance channel. Unbounded on purpose: a control message (assign, revoke) must
/// never be dropped or refused, and the callback thread must not block on a full mailbox while
/// librdkafka waits for it. It cannot grow without bound: at most one revocation is outstanding
/// (its callback blocks until it is handled) and an assignment follows a revocation.
pub fn rebalance_channel() -> (UnboundedSender<RebalanceEvent>, RebalanceEvents) {
    futures::channel::mpsc::unbounded()
}

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
/// needs: we store offsets ourselves, only after the ledger commit (docs/design.md 2), and a
/// partition without a committed offset starts at the earliest retained message, never the
/// latest, which would skip events (first deployments are gated before this: src/offsets.rs).
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
        .set("auto.offset.reset", "earliest")
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
    events: UnboundedSender<RebalanceEvent>,
    revoke_drain_timeout: Duration,
    closing: AtomicBool,
    health: Health,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => self.split_before_assign(list),
            Rebalance::Revoke(list) => {
                self.drain_before_revoke(list);
                match base.commit_consumer_state(CommitMode::Sync) {
                    // Nothing stored since the last (auto-)commit: nothing to do.
                    Ok(())
                    | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) =>
                        {}
                    Err(error) => {
                        tracing::warn!(topic = %self.topic, error.message = %error, "offset commit on revoke failed")
                    }
                }
            }
            Rebalance::Error(_) => {}
        }
    }

    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            // Even an empty assignment means we are a member of the group.
            Rebalance::Assign(_) => self.health.mark_joined(),
            // Marked not joined in pre_rebalance already; the next assignment marks it again.
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => {
                tracing::error!(topic = %self.topic, error.message = %error, "rebalance failed");
                self.health
                    .mark_not_joined(format!("the last consumer group rebalance failed: {error}"));
            }
        }
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

    /// Splits each partition's queue before `assign` starts fetching. librdkafka then never
    /// forwards that partition's messages to the main queue (an application-set forward is kept
    /// across assignments), so no message can arrive out of order through the main queue.
    fn split_before_assign(&self, list: &TopicPartitionList) {
        let partitions = self.partitions_of(list);
        tracing::info!(topic = %self.topic, partitions = ?partitions, "partitions assigned");
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            tracing::error!(topic = %self.topic, partitions = ?partitions,
                "partitions assigned while the consumer is being dropped; they will not be read here");
            return;
        };
        let queues = partitions
            .iter()
            .filter_map(|&partition| {
                let queue = consumer.split_partition_queue(&self.topic, partition);
                if queue.is_none() {
                    tracing::error!(topic = %self.topic, partition, "could not split the partition queue");
                }
                queue.map(|queue| (partition, queue))
            })
            .collect();
        if self
            .events
            .unbounded_send(RebalanceEvent::Assigned { consumer, queues })
            .is_err()
        {
            tracing::error!(topic = %self.topic, partitions = ?partitions,
                "the partition supervisor is gone; assigned partitions will not be read");
        }
    }

    /// Asks the partition side to finish the revoked partitions' batches (so their offsets are
    /// stored before the commit that follows) and waits for its answer.
    fn drain_before_revoke(&self, list: &TopicPartitionList) {
        let partitions = self.partitions_of(list);
        tracing::info!(topic = %self.topic, partitions = ?partitions, "partitions revoked");
        self.health
            .mark_not_joined("a consumer group rebalance is in progress".to_owned());
        // On shutdown the partitions were already stopped (StopPartitions) before closing.
        if partitions.is_empty() || self.closing.load(Ordering::SeqCst) {
            return;
        }
        let (drained, confirmation) = std::sync::mpsc::channel();
        let sent = self.events.unbounded_send(RebalanceEvent::Revoked {
            partitions: partitions.clone(),
            drained,
        });
        if sent.is_err() {
            return;
        }
        if confirmation
            .recv_timeout(self.revoke_drain_timeout + REVOKE_CONFIRM_GRACE)
            .is_err()
        {
            tracing::error!(
                topic = %self.topic,
                partitions = ?partitions,
                "the partition supervisor did not confirm the revocation; committing what is stored"
            );
        }
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
        events: UnboundedSender<RebalanceEvent>,
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
                        events,
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
                    poll_main_queue(&consumer, stop_rx).await;
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

/// Serves rebalances and other events. Every partition is split off before it is assigned, so
/// no message should show up here. If one does anyway, it is not processed out of order: the
/// partition is sought back to it, so its own queue delivers it again, in order, and no offset
/// past it can have been stored by a batch that skipped it.
async fn poll_main_queue(consumer: &EventConsumer, mut stop: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            received = consumer.recv() => match received {
                Ok(message) => {
                    let (topic, partition, offset) =
                        (message.topic().to_owned(), message.partition(), message.offset());
                    drop(message);
                    tracing::error!(
                        topic = %topic,
                        partition,
                        offset,
                        "message arrived on the main queue; seeking its partition back so its own queue reads it in order"
                    );
                    if let Err(error) =
                        consumer.seek(&topic, partition, Offset::Offset(offset), Duration::from_secs(5))
                    {
                        tracing::error!(topic = %topic, partition, offset, error.message = %error,
                            "could not seek back; the message is read again after the next rebalance or restart");
                    }
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
    // Partition queues hold the consumer too; wait briefly for their readers to drop them so
    // that closing (LeaveGroup) happens here, on this thread.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&consumer) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(consumer);
    tracing::info!("kafka consumer closed");
}
