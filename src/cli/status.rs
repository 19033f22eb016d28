//! `webhook-delivery status`: consumer lag per partition (from Kafka) and backlog per broker
//! (from the ledger), whether or not this instance is running.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::table::{duration_ms, one_line, or_dash, timestamp, Table};
use super::{emit, CliError, StatusArgs};
use crate::config::Settings;
use crate::ledger::{BrokerStatus, Ledger};
use crate::offsets::{partition_offsets, PartitionOffsets};

/// How long Kafka may take to answer all of status's questions together.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize)]
struct Status<'a> {
    partitions: &'a [PartitionOffsets],
    brokers: &'a [BrokerStatus],
}

pub async fn status(
    settings: &Settings,
    ledger: &Ledger,
    args: StatusArgs,
) -> Result<(), CliError> {
    let kafka = settings.kafka.clone();
    let offsets = tokio::task::spawn_blocking(move || partition_offsets(&kafka, KAFKA_TIMEOUT));
    let brokers = ledger.broker_statuses().await;
    let offsets = offsets.await.map_err(CliError::KafkaTask)?;

    match (offsets, brokers) {
        (Ok(partitions), Ok(brokers)) => {
            let text = if args.json {
                let status = Status {
                    partitions: &partitions,
                    brokers: &brokers,
                };
                serde_json::to_string_pretty(&status).expect("status serializes") + "\n"
            } else {
                render(settings, &partitions, &brokers)
            };
            emit(&text)
        }
        // Half a picture beats none at 2am: show what could be read, then fail.
        (offsets, brokers) => {
            let mut unavailable = Vec::new();
            if let Err(error) = &offsets {
                eprintln!("{}", super::chain("Kafka could not be read", error));
                unavailable.push("Kafka");
            }
            if let Err(error) = &brokers {
                eprintln!("{}", super::chain("the ledger could not be read", error));
                unavailable.push("the ledger");
            }
            if !args.json {
                let mut text = String::new();
                if let Ok(partitions) = &offsets {
                    text.push_str(&partitions_table(settings, partitions));
                }
                if let Ok(brokers) = &brokers {
                    text.push_str(&brokers_table(brokers));
                }
                emit(&text)?;
            }
            Err(CliError::StatusIncomplete(unavailable.join(" and ")))
        }
    }
}

fn render(
    settings: &Settings,
    partitions: &[PartitionOffsets],
    brokers: &[BrokerStatus],
) -> String {
    let mut text = partitions_table(settings, partitions);
    text.push('\n');
    text.push_str(&brokers_table(brokers));
    text.push('\n');
    text.push_str(&format!(
        "total lag {}, total pending {}, total dead {}\n",
        partitions.iter().map(|p| p.lag).sum::<i64>(),
        brokers.iter().map(|b| b.pending).sum::<i64>(),
        brokers.iter().map(|b| b.dead).sum::<i64>(),
    ));
    text
}

pub(super) fn partitions_table(settings: &Settings, partitions: &[PartitionOffsets]) -> String {
    let mut table = Table::new(&[
        ("partition", true),
        ("committed", true),
        ("low_watermark", true),
        ("high_watermark", true),
        ("lag", true),
    ]);
    for p in partitions {
        table.row(vec![
            p.partition.to_string(),
            or_dash(p.committed),
            p.low_watermark.to_string(),
            p.high_watermark.to_string(),
            p.lag.to_string(),
        ]);
    }
    format!(
        "Kafka topic `{}`, consumer group `{}` (committed `-`: the group never committed there)\n{}",
        settings.kafka.topic,
        settings.kafka.group_id,
        table.render()
    )
}

fn brokers_table(brokers: &[BrokerStatus]) -> String {
    let mut table = Table::new(&[
        ("broker_id", false),
        ("enabled", false),
        ("circuit", false),
        ("pending", true),
        ("dead", true),
        ("oldest_pending", true),
        ("last_error", false),
    ]);
    let mut notes = String::new();
    let now = Utc::now();
    for b in brokers {
        let circuit = match b.circuit_open_until {
            // Past: whoever recorded it stopped sending there, or its next request is the probe.
            Some(until) if b.circuit_state == "open" && until < now => {
                format!("open until {} (passed)", short_time(until, now))
            }
            Some(until) if b.circuit_state == "open" => {
                format!("open until {}", short_time(until, now))
            }
            _ => b.circuit_state.clone(),
        };
        let last_error = match (&b.last_error, b.last_error_at) {
            (Some(error), Some(at)) => format!("{} ({})", one_line(error, 60), timestamp(at)),
            (Some(error), None) => one_line(error, 60),
            _ => "-".to_owned(),
        };
        table.row(vec![
            b.broker_id.clone(),
            if b.enabled { "yes" } else { "no" }.to_owned(),
            circuit,
            b.pending.to_string(),
            b.dead.to_string(),
            b.oldest_pending_age_ms
                .map_or_else(|| "-".to_owned(), duration_ms),
            last_error,
        ]);
        if !b.enabled {
            let reason = b.disabled_reason.as_deref().unwrap_or("no reason recorded");
            notes.push_str(&format!(
                "{} is disabled: {}\n",
                b.broker_id,
                one_line(reason, 200)
            ));
        }
    }
    format!("Brokers\n{}{notes}", table.render())
}

/// Time of day when it is within a day of now, else the full date and time.
fn short_time(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    if (at - now).num_hours().abs() < 24 {
        at.format("%H:%M:%SZ").to_string()
    } else {
        at.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    }
}
