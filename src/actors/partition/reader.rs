//! The reader task of one tenure: the only code that takes messages from a partition's queue.
//!
//! One reader per partition at any moment, by construction: the supervisor starts a tenure's
//! reader with the previous reader's `JoinHandle` for the same partition, and the new reader
//! awaits it before its first read. A revoked reader stops at its next step (every wait is raced
//! against the revocation, which is raised synchronously in the rebalance path before any new
//! assignment), so that wait is short even when the old actor's claim is stuck on the database.
//! The new reader then also waits until the earlier tenures' actors have stopped (their last
//! claim is over), so one partition's claims never overlap.
//! Messages a revoked reader took but did not hand over are simply dropped: nothing past them is
//! stored under its tenure, so they are read again (from the committed offset after a
//! reassignment, or from the point the successor seeks to).

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use futures::FutureExt;
use rdkafka::consumer::Consumer;
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset};
use tokio::task::JoinHandle;

use super::{PartitionActor, ProcessBatch, Tenure};
use crate::admin::Health;
use crate::kafka::{EventConsumer, PartitionQueue};

/// Everything one reader owns.
pub struct PartitionReader {
    pub topic: String,
    pub tenure: Arc<Tenure>,
    pub queue: PartitionQueue,
    pub consumer: Arc<EventConsumer>,
    pub actor: Addr<PartitionActor>,
    pub max_batch: usize,
    pub health: Health,
    /// The previous reader of this partition on this instance, if any.
    pub predecessor_reader: Option<JoinHandle<()>>,
    /// Earlier tenures of this partition whose actors may still be claiming.
    pub predecessors: Vec<Arc<Tenure>>,
    /// A tenure cut short while the partition stayed assigned (no rebalance reset the fetch
    /// position): resume exactly where it stopped.
    pub resume_after: Option<Arc<Tenure>>,
}

/// Reads the partition's queue: waits for one message, then takes whatever else is already
/// there (up to `max_batch`), and hands the batch over. The next batch is read only after the
/// previous one is in the ledger, so batches grow by themselves when the database is slow.
pub async fn read_partition(reader: PartitionReader) {
    let PartitionReader {
        topic,
        tenure,
        queue,
        consumer,
        actor,
        max_batch,
        health,
        predecessor_reader,
        predecessors,
        resume_after,
    } = reader;
    let partition = tenure.partition;
    // The one-reader rule: the previous reader has returned (and dropped its queue handle)
    // before this one reads anything. It was revoked, so this is quick.
    if let Some(handle) = predecessor_reader {
        let _ = handle.await;
    }
    let predecessors_done = async {
        for previous in &predecessors {
            previous.actor_stopped().await;
        }
    };
    tokio::select! {
        biased;
        () = tenure.revoked() => return,
        () = predecessors_done => {}
    }
    drop(predecessors);
    if let Some(offset) = resume_after.and_then(|previous| previous.resume_from()) {
        if let Err(error) = seek(&consumer, &topic, partition, offset).await {
            // Reading on would skip what the previous reader dropped: stop, and have the pod
            // restarted (it then reads from the committed offset).
            tracing::error!(topic = %topic, partition, offset, error.message = %error,
                "could not seek to where the previous reader of this partition stopped; /healthz now fails so the pod gets restarted");
            health.mark_broken(format!(
                "partition {partition} of {topic} could not resume at offset {offset}"
            ));
            return;
        }
        tracing::info!(topic = %topic, partition, offset,
            "resuming where the previous reader of this partition stopped");
    }
    loop {
        let first = tokio::select! {
            biased;
            () = tenure.revoked() => return,
            received = queue.recv() => received,
        };
        let mut messages: Vec<OwnedMessage> = Vec::new();
        match first {
            Ok(message) => messages.push(message.detach()),
            Err(error) => {
                tracing::warn!(topic = %topic, partition, error.message = %error, "error reading a partition queue");
                continue;
            }
        }
        while messages.len() < max_batch && !tenure.is_revoked() {
            match queue.recv().now_or_never() {
                Some(Ok(message)) => messages.push(message.detach()),
                Some(Err(error)) => {
                    tracing::warn!(topic = %topic, partition, error.message = %error, "error reading a partition queue");
                    break;
                }
                None => break,
            }
        }
        let (first_offset, last_offset) =
            (messages[0].offset(), messages[messages.len() - 1].offset());
        if tenure.is_revoked() {
            tenure.dropped_from(first_offset);
            return;
        }
        tenure.handed_over(first_offset, last_offset);
        let handed = tokio::select! {
            biased;
            // The batch stays with the actor (it finishes, or its tenure ends first); this
            // reader must not wait for a claim that may be stuck on the database.
            () = tenure.revoked() => return,
            handed = actor.send(ProcessBatch { messages }) => handed,
        };
        if handed.is_err() {
            if !tenure.is_revoked() {
                // Gone without being revoked (a panic in its handler): nothing reads this
                // partition any more. Say so loudly and fail the health check so the pod is
                // restarted; the batch was not claimed, so its offset was not stored and the
                // next owner reads it again.
                tracing::error!(
                    topic = %topic,
                    partition,
                    "partition actor stopped unexpectedly; this partition is no longer consumed; /healthz now fails so the pod gets restarted"
                );
                health.mark_broken(format!(
                    "partition {partition} of {topic} is no longer consumed (its actor stopped unexpectedly)"
                ));
            }
            return;
        }
    }
}

/// Moves the partition's fetch position to `offset`. Blocking in librdkafka, hence the thread.
async fn seek(
    consumer: &Arc<EventConsumer>,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<(), String> {
    let (consumer, topic) = (consumer.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        consumer.seek(
            &topic,
            partition,
            Offset::Offset(offset),
            Duration::from_secs(10),
        )
    })
    .await
    .map_err(|error| error.to_string())?
    .map_err(|error| error.to_string())
}
