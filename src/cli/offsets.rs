//! `webhook-delivery offsets show` and `offsets seed`: where this service's consumer group
//! stands on the topic, and setting its starting point before the first start (the cutover from
//! the consumer it replaces, RUNBOOK.md "Cutover"). Seeding writes only `kafka.group_id`'s
//! offsets; the old consumer's group is only read.

use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};

use super::status::partitions_table;
use super::table::{or_dash, Table};
use super::{emit, CliError};
use crate::config::Settings;
use crate::offsets::{self, OffsetsError, SeedRow, SeedSource};

/// How long Kafka may take to answer one command's questions together.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Subcommand)]
pub enum OffsetsCommand {
    /// Per partition: the group's committed offset, low and high watermark, lag.
    Show {
        /// A JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Commit the group's starting offsets before its first start (every instance stopped).
    Seed(SeedArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["from_group", "at", "latest"])))]
pub struct SeedArgs {
    /// Start where this consumer group (the consumer being replaced) has committed.
    #[arg(long, value_name = "OLD_GROUP")]
    from_group: Option<String>,
    /// Start at the first message at or after this time (RFC 3339, e.g. 2026-11-25T02:00:00Z).
    #[arg(long, value_name = "RFC3339")]
    at: Option<DateTime<Utc>>,
    /// Start after the last message now in the topic: only new events are sent.
    #[arg(long)]
    latest: bool,
    /// Print the plan, commit nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum OffsetsCliError {
    #[error("Kafka could not be read or written")]
    Kafka(#[from] OffsetsError),
    #[error("the Kafka task did not finish")]
    Task(#[source] tokio::task::JoinError),
}

impl From<OffsetsCliError> for CliError {
    fn from(error: OffsetsCliError) -> Self {
        CliError::Offsets(Box::new(error))
    }
}

pub async fn offsets(settings: &Settings, command: OffsetsCommand) -> Result<(), CliError> {
    let kafka = settings.kafka.clone();
    match command {
        OffsetsCommand::Show { json } => {
            let partitions =
                blocking(move || offsets::partition_offsets(&kafka, KAFKA_TIMEOUT)).await?;
            if json {
                emit(
                    &(serde_json::to_string_pretty(&partitions).expect("offsets serialize") + "\n"),
                )
            } else {
                let total: i64 = partitions.iter().map(|p| p.lag).sum();
                emit(&format!(
                    "{}total lag: {total}\n",
                    partitions_table(settings, &partitions)
                ))
            }
        }
        OffsetsCommand::Seed(args) => {
            let source = match (args.from_group, args.at, args.latest) {
                (Some(group), _, _) => SeedSource::FromGroup(group),
                (None, Some(at), _) => SeedSource::At(at),
                _ => SeedSource::Latest,
            };
            let plan_source = source.clone();
            let rows = blocking({
                let kafka = kafka.clone();
                move || offsets::plan_seed(&kafka, &plan_source, KAFKA_TIMEOUT)
            })
            .await?;
            emit(&render_plan(settings, &source, &rows))?;
            if args.dry_run {
                let members = blocking({
                    let kafka = kafka.clone();
                    move || Ok(offsets::active_members(&kafka, KAFKA_TIMEOUT))
                })
                .await?;
                if let Some(members) = members.filter(|m| *m > 0) {
                    emit(&format!(
                        "note: group `{}` has {members} active member(s); stop every instance before seeding\n",
                        settings.kafka.group_id
                    ))?;
                }
                return emit("dry run: nothing committed\n");
            }
            blocking(move || offsets::commit_seed(&kafka, &rows, KAFKA_TIMEOUT)).await?;
            emit(&format!(
                "committed: group `{}` starts from the offsets above on its next start\n",
                settings.kafka.group_id
            ))
        }
    }
}

fn render_plan(settings: &Settings, source: &SeedSource, rows: &[SeedRow]) -> String {
    let from = match source {
        SeedSource::FromGroup(group) => format!("where group `{group}` has committed"),
        SeedSource::At(at) => format!(
            "the first message at or after {}",
            super::table::timestamp(*at)
        ),
        SeedSource::Earliest => "the earliest retained message".to_owned(),
        SeedSource::Latest => "the end of the topic (only new events)".to_owned(),
    };
    let mut table = Table::new(&[
        ("partition", true),
        ("committed_now", true),
        ("seed", true),
        ("low_watermark", true),
        ("high_watermark", true),
        ("to_read", true),
    ]);
    for row in rows {
        table.row(vec![
            row.partition.to_string(),
            or_dash(row.committed),
            row.seed.to_string(),
            row.low_watermark.to_string(),
            row.high_watermark.to_string(),
            (row.high_watermark - row.seed).max(0).to_string(),
        ]);
    }
    let to_read: i64 = rows
        .iter()
        .map(|r| (r.high_watermark - r.seed).max(0))
        .sum();
    format!(
        "Seeding consumer group `{}` on topic `{}` from {from}\n{}messages to read (and deliver) on start: {to_read}\n",
        settings.kafka.group_id,
        settings.kafka.topic,
        table.render()
    )
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, OffsetsError> + Send + 'static,
) -> Result<T, OffsetsCliError> {
    Ok(tokio::task::spawn_blocking(work)
        .await
        .map_err(OffsetsCliError::Task)??)
}
