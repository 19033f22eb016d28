//! Consumer-group progress on the events topic, read straight from Kafka: per partition, what the
//! group has committed, the watermarks and the lag (`webhook-delivery status`, `offsets show`,
//! the lag metric); and the cutover tools that write this service's own group's starting offsets
//! before it first consumes (`offsets seed`, the first-start gate). Nothing here subscribes, so
//! it never joins the group or triggers a rebalance; only [`commit_seed`] writes, and only to
//! `kafka.group_id`.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::{InitialOffsets, KafkaSettings};

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
    #[error(
        "group `{group_id}` has no committed offset on partitions {partitions:?} of `{topic}`; \
         seed with --at or --latest instead, or check the group name"
    )]
    SourceGroupIncomplete {
        group_id: String,
        topic: String,
        partitions: Vec<i32>,
    },
    #[error("could not look up the offsets of `{topic}` at {at}")]
    OffsetsForTime {
        topic: String,
        at: DateTime<Utc>,
        #[source]
        source: Box<KafkaError>,
    },
    #[error(
        "group `{group_id}` has {members} active member(s): stop every webhook-delivery instance \
         before seeding its offsets"
    )]
    GroupActive { group_id: String, members: usize },
    #[error("could not commit the starting offsets of group `{group_id}`")]
    Commit {
        group_id: String,
        #[source]
        source: Box<KafkaError>,
    },
}

/// Where `offsets seed` starts the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeedSource {
    /// Where another consumer group (the consumer being replaced) has got to.
    FromGroup(String),
    /// The first message at or after this time; the high watermark where there is none.
    At(DateTime<Utc>),
    Earliest,
    Latest,
}

/// One partition of a seeding plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeedRow {
    pub partition: i32,
    /// What the group has committed now (`None`: nothing).
    pub committed: Option<i64>,
    /// The offset the group will start from.
    pub seed: i64,
    pub low_watermark: i64,
    pub high_watermark: i64,
}

/// A client for `group_id` that never commits by itself and never subscribes.
fn client(settings: &KafkaSettings, group_id: &str) -> Result<BaseConsumer, OffsetsError> {
    let mut config = ClientConfig::new();
    // The platform team's properties (security, SASL...) apply to this client as well.
    for (key, value) in &settings.client {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", group_id)
        // This client must never move the group's offsets by itself.
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| OffsetsError::Create(Box::new(e)))
}

/// The topic's partitions, sorted.
fn topic_partitions(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, OffsetsError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
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
    Ok(partitions)
}

/// The committed offset of each partition for the client's group (`None`: never committed).
fn committed_offsets(
    consumer: &BaseConsumer,
    group_id: &str,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> Result<Vec<Option<i64>>, OffsetsError> {
    let committed_error = |source| OffsetsError::Committed {
        group_id: group_id.to_owned(),
        topic: topic.to_owned(),
        source: Box::new(source),
    };
    let mut list = TopicPartitionList::new();
    for &partition in partitions {
        list.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(list, timeout)
        .map_err(committed_error)?;
    partitions
        .iter()
        .map(
            |&partition| match committed.find_partition(topic, partition) {
                Some(element) => {
                    element.error().map_err(committed_error)?;
                    Ok(match element.offset() {
                        Offset::Offset(offset) => Some(offset),
                        // Invalid: the group has never committed on this partition.
                        _ => None,
                    })
                }
                None => Ok(None),
            },
        )
        .collect()
}

fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<(i64, i64), OffsetsError> {
    consumer
        .fetch_watermarks(topic, partition, timeout)
        .map_err(|source| OffsetsError::Watermarks {
            topic: topic.to_owned(),
            partition,
            source: Box::new(source),
        })
}

/// Committed offset, watermarks and lag of every partition of `settings.topic` for the group
/// `settings.group_id`, in partition order. Blocking: `timeout` bounds the Kafka requests
/// together (closing the client afterwards adds a moment).
pub fn partition_offsets(
    settings: &KafkaSettings,
    timeout: Duration,
) -> Result<Vec<PartitionOffsets>, OffsetsError> {
    let (_, positions) = group_positions(settings, Instant::now() + timeout)?;
    Ok(positions)
}

/// What `partition_offsets` reads, with the client that read it (for more reads before the
/// same `deadline`).
fn group_positions(
    settings: &KafkaSettings,
    deadline: Instant,
) -> Result<(BaseConsumer, Vec<PartitionOffsets>), OffsetsError> {
    let remaining = || deadline.saturating_duration_since(Instant::now());
    let topic = settings.topic.as_str();
    let consumer = client(settings, &settings.group_id)?;
    let partitions = topic_partitions(&consumer, topic, remaining())?;
    let committed = committed_offsets(
        &consumer,
        &settings.group_id,
        topic,
        &partitions,
        remaining(),
    )?;
    let positions = partitions
        .into_iter()
        .zip(committed)
        .map(|(partition, committed)| {
            let (low_watermark, high_watermark) =
                watermarks(&consumer, topic, partition, remaining())?;
            Ok(PartitionOffsets {
                partition,
                committed,
                low_watermark,
                high_watermark,
                lag: lag(committed, low_watermark, high_watermark),
            })
        })
        .collect::<Result<Vec<_>, OffsetsError>>()?;
    Ok((consumer, positions))
}

/// Where `kafka.group_id` would start on each partition of `settings.topic` if seeded from
/// `source`. Reads only. Seeds are kept inside the retained range: an old group's commit below
/// the low watermark starts at the low watermark, one past the end at the high watermark.
pub fn plan_seed(
    settings: &KafkaSettings,
    source: &SeedSource,
    timeout: Duration,
) -> Result<Vec<SeedRow>, OffsetsError> {
    let deadline = Instant::now() + timeout;
    let remaining = || deadline.saturating_duration_since(Instant::now());
    let topic = settings.topic.as_str();
    let (consumer, positions) = group_positions(settings, deadline)?;
    let partitions: Vec<i32> = positions.iter().map(|p| p.partition).collect();
    let wanted: Vec<Option<i64>> = match source {
        SeedSource::Earliest => positions.iter().map(|p| Some(p.low_watermark)).collect(),
        SeedSource::Latest => positions.iter().map(|p| Some(p.high_watermark)).collect(),
        SeedSource::FromGroup(group_id) => {
            let old = client(settings, group_id)?;
            let offsets = committed_offsets(&old, group_id, topic, &partitions, remaining())?;
            let missing: Vec<i32> = partitions
                .iter()
                .zip(&offsets)
                .filter(|(_, offset)| offset.is_none())
                .map(|(partition, _)| *partition)
                .collect();
            if !missing.is_empty() {
                return Err(OffsetsError::SourceGroupIncomplete {
                    group_id: group_id.clone(),
                    topic: topic.to_owned(),
                    partitions: missing,
                });
            }
            offsets
        }
        SeedSource::At(at) => {
            let mut list = TopicPartitionList::new();
            for &partition in &partitions {
                list.add_partition_offset(topic, partition, Offset::Offset(at.timestamp_millis()))
                    .map_err(|source| OffsetsError::OffsetsForTime {
                        topic: topic.to_owned(),
                        at: *at,
                        source: Box::new(source),
                    })?;
            }
            let found = consumer
                .offsets_for_times(list, remaining())
                .map_err(|source| OffsetsError::OffsetsForTime {
                    topic: topic.to_owned(),
                    at: *at,
                    source: Box::new(source),
                })?;
            partitions
                .iter()
                .map(|&partition| match found.find_partition(topic, partition) {
                    Some(element) => match element.offset() {
                        Offset::Offset(offset) => Some(offset),
                        // No message at or after that time: start after the last one.
                        _ => None,
                    },
                    None => None,
                })
                .collect()
        }
    };
    Ok(positions
        .into_iter()
        .zip(wanted)
        .map(|(position, wanted)| SeedRow {
            partition: position.partition,
            committed: position.committed,
            seed: seed_offset(wanted, position.low_watermark, position.high_watermark),
            low_watermark: position.low_watermark,
            high_watermark: position.high_watermark,
        })
        .collect())
}

/// The wanted offset kept inside what the topic retains; `None` (nothing at or after the
/// requested time) starts after the last message.
pub fn seed_offset(wanted: Option<i64>, low_watermark: i64, high_watermark: i64) -> i64 {
    wanted
        .unwrap_or(high_watermark)
        .clamp(low_watermark, high_watermark.max(low_watermark))
}

/// How many members `kafka.group_id` has right now. `None` when the broker does not say (then
/// the commit itself is what refuses an active group).
pub fn active_members(settings: &KafkaSettings, timeout: Duration) -> Option<usize> {
    let consumer = client(settings, &settings.group_id).ok()?;
    let groups = consumer
        .fetch_group_list(Some(&settings.group_id), timeout)
        .ok()?;
    groups
        .groups()
        .iter()
        .find(|group| group.name() == settings.group_id)
        .map(|group| group.members().len())
}

/// Commits the plan's offsets as `kafka.group_id`'s starting point. Refuses while the group
/// has members: a running instance would overwrite them, or be overtaken.
pub fn commit_seed(
    settings: &KafkaSettings,
    rows: &[SeedRow],
    timeout: Duration,
) -> Result<(), OffsetsError> {
    let group_id = settings.group_id.clone();
    if let Some(members) = active_members(settings, timeout).filter(|members| *members > 0) {
        return Err(OffsetsError::GroupActive { group_id, members });
    }
    let consumer = client(settings, &group_id)?;
    let mut list = TopicPartitionList::new();
    for row in rows {
        list.add_partition_offset(&settings.topic, row.partition, Offset::Offset(row.seed))
            .map_err(|source| OffsetsError::Commit {
                group_id: group_id.clone(),
                source: Box::new(source),
            })?;
    }
    consumer
        .commit(&list, CommitMode::Sync)
        .map_err(|source| OffsetsError::Commit {
            group_id,
            source: Box::new(source),
        })
}

/// What `serve` does about where to start, decided before it joins the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartDecision {
    /// Not a first deployment (the ledger has events or the group has committed offsets):
    /// consume; a partition without a committed offset starts at the earliest message.
    Consume,
    /// A first deployment with `kafka.initial_offsets` set: commit that starting point, then
    /// consume. Committing it makes the choice stick: a restart before anything was consumed
    /// does not skip what arrived meanwhile.
    Seed(InitialOffsets),
    /// A first deployment without a decision: do not consume (the whole retention would be sent
    /// to every broker again).
    Wait,
}

pub fn start_decision(
    ledger_has_events: bool,
    offsets: &[PartitionOffsets],
    initial_offsets: Option<InitialOffsets>,
) -> StartDecision {
    if ledger_has_events || offsets.iter().any(|p| p.committed.is_some()) {
        return StartDecision::Consume;
    }
    match initial_offsets {
        Some(initial) => StartDecision::Seed(initial),
        None => StartDecision::Wait,
    }
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
    use super::*;

    fn partition(committed: Option<i64>) -> PartitionOffsets {
        PartitionOffsets {
            partition: 0,
            committed,
            low_watermark: 0,
            high_watermark: 10,
            lag: 0,
        }
    }

    #[test]
    fn a_first_deployment_waits_unless_told_where_to_start() {
        let fresh = [partition(None), partition(None)];
        assert_eq!(start_decision(false, &fresh, None), StartDecision::Wait);
        assert_eq!(
            start_decision(false, &fresh, Some(InitialOffsets::Latest)),
            StartDecision::Seed(InitialOffsets::Latest)
        );
    }

    #[test]
    fn events_in_the_ledger_or_any_commit_mean_it_is_not_a_first_deployment() {
        let fresh = [partition(None), partition(None)];
        assert_eq!(start_decision(true, &fresh, None), StartDecision::Consume);
        let seeded = [partition(None), partition(Some(4))];
        assert_eq!(start_decision(false, &seeded, None), StartDecision::Consume);
        // initial_offsets only matters on a first deployment.
        assert_eq!(
            start_decision(true, &fresh, Some(InitialOffsets::Latest)),
            StartDecision::Consume
        );
    }

    #[test]
    fn seeds_stay_inside_the_retained_range() {
        assert_eq!(seed_offset(Some(50), 40, 90), 50);
        assert_eq!(seed_offset(Some(10), 40, 90), 40);
        assert_eq!(seed_offset(Some(120), 40, 90), 90);
        assert_eq!(seed_offset(None, 40, 90), 90);
        assert_eq!(seed_offset(None, 0, 0), 0);
    }

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
