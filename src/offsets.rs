//! Consumer-group progress on the events topic, read straight from Kafka: per partition, what the
//! group has committed, the watermarks and the lag. Used by `webhook-delivery status` and the lag
//! metric. It only reads: it never subscribes, so it never joins the group or triggers a rebalance.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::KafkaSettings;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionOffsets {
    pub partition: i32,
    /// The group's committed offset (the next message it will read); `None` if it never committed.
    pub committed: Option<i64>,
    pub low_watermark: i64,
    pub high_watermark: i64,
    /// Messages the group has not consumed yet.
    pub lag: i64,
}

/// Sources are boxed: `KafkaError` is large and this travels through every `Result` here.
#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error("could not create the Kafka client")]
    Create(#[source] Box<KafkaError>),
    #[error("could not read the metadata of topic `{topic}`")]
    Metadata {
        topic: String,
        #[source]
        source: Box<KafkaError>,
    },
    #[error("topic `{topic}` does not exist or has no partitions ({detail})")]
    UnknownTopic { topic: String, detail: String },
    #[error("could not read the watermarks of `{topic}` partition {partition}")]
    Watermarks {
        topic: String,
        partition: i32,
        #[source]
        source: Box<KafkaError>,
    },
    #[error("could not read the committed offsets of group `{group_id}` on `{topic}`")]
    Committed {
        group_id: String,
        topic: String,
        #[source]
        source: Box<KafkaError>,
    },
}

/// Committed offset, watermarks and lag of every partition of `settings.topic` for the group
/// `settings.group_id`, in partition order. Blocking: `timeout` bounds the Kafka requests
/// together (closing the client afterwards adds a moment).
pub fn partition_offsets(
    settings: &KafkaSettings,
    timeout: Duration,
) -> Result<Vec<PartitionOffsets>, OffsetsError> {
    let deadline = Instant::now() + timeout;
    let remaining = || deadline.saturating_duration_since(Instant::now());
    let topic = settings.topic.as_str();

    let mut config = ClientConfig::new();
    // The platform team's properties (security, SASL...) apply to this client as well.
    for (key, value) in &settings.client {
        config.set(key, value);
    }
    let consumer: BaseConsumer = config
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group_id)
        // This client must never move the group's offsets.
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| OffsetsError::Create(Box::new(e)))?;

    let metadata = consumer
        .fetch_metadata(Some(topic), remaining())
        .map_err(|source| OffsetsError::Metadata {
            topic: topic.to_owned(),
            source: Box::new(source),
        })?;
    let unknown = |detail: String| OffsetsError::UnknownTopic {
        topic: topic.to_owned(),
        detail,
    };
    let Some(topic_metadata) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(unknown("not in the metadata".to_owned()));
    };
    if let Some(error) = topic_metadata.error() {
        return Err(unknown(format!("{error:?}")));
    }
    let mut partitions: Vec<i32> = topic_metadata.partitions().iter().map(|p| p.id()).collect();
    if partitions.is_empty() {
        return Err(unknown("no partitions".to_owned()));
    }
    partitions.sort_unstable();

    let mut list = TopicPartitionList::new();
    for &partition in &partitions {
        list.add_partition(topic, partition);
    }
    let committed_error = |source| OffsetsError::Committed {
        group_id: settings.group_id.clone(),
        topic: topic.to_owned(),
        source: Box::new(source),
    };
    let committed = consumer
        .committed_offsets(list, remaining())
        .map_err(committed_error)?;

    partitions
        .into_iter()
        .map(|partition| {
            let (low_watermark, high_watermark) = consumer
                .fetch_watermarks(topic, partition, remaining())
                .map_err(|source| OffsetsError::Watermarks {
                    topic: topic.to_owned(),
                    partition,
                    source: Box::new(source),
                })?;
            let committed = match committed.find_partition(topic, partition) {
                Some(element) => {
                    element.error().map_err(committed_error)?;
                    match element.offset() {
                        Offset::Offset(offset) => Some(offset),
                        // Invalid: the group has never committed on this partition.
                        _ => None,
                    }
                }
                None => None,
            };
            Ok(PartitionOffsets {
                partition,
                committed,
                low_watermark,
                high_watermark,
                lag: lag(committed, low_watermark, high_watermark),
            })
        })
        .collect()
}

/// With nothing committed the group would start at the low watermark (`auto.offset.reset =
/// earliest`), so everything still in the topic is lag. Never negative: a committed offset
/// beyond the high watermark (a recreated topic) means nothing to read, not negative work.
pub fn lag(committed: Option<i64>, low_watermark: i64, high_watermark: i64) -> i64 {
    let start = committed.unwrap_or(low_watermark).max(low_watermark);
    (high_watermark - start).max(0)
}

#[cfg(test)]
mod tests {
    use super::lag;

    #[test]
    fn lag_is_high_watermark_minus_committed() {
        assert_eq!(lag(Some(120), 0, 120), 0);
        assert_eq!(lag(Some(100), 0, 120), 20);
    }

    #[test]
    fn without_a_commit_everything_retained_is_lag() {
        assert_eq!(lag(None, 0, 15), 15);
        assert_eq!(lag(None, 40, 55), 15);
    }

    #[test]
    fn lag_is_never_negative() {
        assert_eq!(lag(Some(200), 0, 120), 0);
    }

    #[test]
    fn a_commit_below_retention_counts_only_what_is_still_there() {
        assert_eq!(lag(Some(10), 40, 55), 15);
    }
}
