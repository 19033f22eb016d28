//! Command line: `serve`, `migrate`, `dead-letters`, `backfill`, `status`, `report` and `offsets`.

mod offsets;
mod report;
mod status;
mod table;

use std::io::Write;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::RetentionSettings;
use crate::ledger::{
    BackfillOutcome, BackfillRequest, DeadLetter, Ledger, LedgerError, MigrationScope,
    ReplayOutcome, ReplaySelector,
};

pub use offsets::{offsets, OffsetsCommand};
pub use report::report;
pub use status::status;

#[derive(Debug, Parser)]
#[command(
    name = "webhook-delivery",
    version,
    about = "Kafka shipment events to signed broker webhooks"
)]
pub struct Cli {
    /// A TOML file layered over config/base.toml (environment variables still win).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume and deliver until SIGTERM/SIGINT. Refuses to start on a ledger schema older than
    /// this build needs (run `migrate` first); runs no DDL itself.
    Serve,
    /// Apply pending ledger migrations and exit. Safe while older instances run.
    Migrate(MigrateArgs),
    /// Inspect and replay deliveries that were given up on.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// Create the deliveries a broker missed while it was disabled or not yet subscribed.
    ///
    /// For every event consumed in the window (from the ledger's `events` table) of a load the
    /// broker subscribes to now, creates the missing delivery: same webhook-id and
    /// webhook-sequence as a normal claim would have given it. Existing deliveries (delivered,
    /// dead or pending) are left alone, so running it twice creates nothing the second time.
    /// The new deliveries are sent within a few seconds by the running service, in offset order
    /// per load; a load's later events that were already delivered are not held back, so the
    /// broker can receive a lower webhook-sequence than the last one (webhook contract §4).
    /// Only events the ledger still holds can be backfilled: retention removes an event
    /// `[retention] delivered_ms` (default 7 days) after it was consumed, once none of its
    /// deliveries is left. The broker must be enabled.
    Backfill(BackfillArgs),
    /// Where are we: consumer lag per partition, backlog and circuit state per broker.
    ///
    /// Reads Kafka and the ledger directly, so it works whether or not this instance is running.
    Status(StatusArgs),
    /// Incident reports from the ledger. They see only what retention keeps: delivered
    /// deliveries for `[retention] delivered_ms` (default 7 days), dead ones for `dead_ms`
    /// (default 30 days).
    #[command(subcommand)]
    Report(ReportCommand),
    /// The consumer group's offsets: show them, or seed them before a first start (cutover).
    #[command(subcommand)]
    Offsets(OffsetsCommand),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Stop after this migration version (staged rollouts; tests). Default: apply all.
    #[arg(long, conflicts_with = "required_only")]
    pub to: Option<i32>,
    /// Apply only what this build's `serve` needs (its transactional migrations, each a brief
    /// catalogue change) and leave the online index builds, which can take minutes on a large
    /// ledger, for a later `migrate` (docs/migrations.md).
    #[arg(long)]
    pub required_only: bool,
}

impl MigrateArgs {
    pub fn scope(&self) -> MigrationScope {
        match (self.to, self.required_only) {
            (_, true) => MigrationScope::Required,
            (Some(version), false) => MigrationScope::UpTo(version),
            (None, false) => MigrationScope::All,
        }
    }
}

#[derive(Debug, Args)]
pub struct BackfillArgs {
    /// The broker that missed deliveries (brokers.broker_id).
    #[arg(long)]
    pub broker: String,
    /// Events consumed at or after this time (RFC 3339, e.g. 2026-11-25T02:00:00Z).
    #[arg(long)]
    pub since: DateTime<Utc>,
    /// Events consumed before this time (RFC 3339). Default: when the backfill starts.
    #[arg(long)]
    pub until: Option<DateTime<Utc>>,
    /// Only the events of this load.
    #[arg(long)]
    pub load: Option<String>,
    /// Count the deliveries that would be created; create nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// One JSON object instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One JSON object {"partitions": [...], "brokers": [...]} instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// Webhook-ids a broker answered 2xx to more than once, then a per-broker summary.
    ///
    /// Only answers the ledger recorded count: a request that timed out may have arrived too.
    /// And only answers it still keeps: a delivered delivery's attempts are removed
    /// `[retention] delivered_ms` (default 7 days) after delivery. When --since reaches further
    /// back, stderr says so.
    Duplicates {
        /// Start of the window, inclusive, matched against when each attempt started
        /// (RFC 3339, e.g. 2026-11-25T02:00:00Z).
        #[arg(long)]
        since: DateTime<Utc>,
        /// End of the window, exclusive (RFC 3339). Default: now.
        #[arg(long)]
        until: Option<DateTime<Utc>>,
        #[arg(long, value_enum, default_value_t = ReportFormat::Csv)]
        format: ReportFormat,
    },
    /// The full story of one event: where it was consumed, then every attempt per broker.
    ///
    /// Only while the ledger keeps it: delivered deliveries go `[retention] delivered_ms`
    /// (default 7 days) after delivery, dead ones `dead_ms` (default 30 days) after they died,
    /// and the event with its last delivery.
    Deliveries {
        /// The event's eventId, or its idempotency key (`sha256:...`) if it has no eventId.
        #[arg(long)]
        event_id: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    Csv,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// List dead deliveries, oldest first. Dead deliveries are kept for `[retention] dead_ms`
    /// (default 30 days) after they died, then removed with their attempts.
    List {
        #[arg(long)]
        broker: Option<String>,
        /// Only those that died at or after this time (RFC 3339, e.g. 2026-11-25T02:00:00Z).
        #[arg(long)]
        since: Option<DateTime<Utc>>,
        #[arg(long, default_value_t = 1000)]
        limit: i64,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send dead deliveries again, with a fresh attempt budget and the same webhook-id. Only
    /// dead deliveries the ledger still keeps (`[retention] dead_ms`, default 30 days) can be
    /// replayed.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// One delivery, by the delivery_id shown by `dead-letters list`.
    #[arg(long, group = "target", required_unless_present = "broker")]
    id: Option<i64>,
    /// Every dead delivery of this broker (optionally only since --since).
    #[arg(long, group = "target")]
    broker: Option<String>,
    /// With --broker: only those that died at or after this time (RFC 3339).
    #[arg(long, requires = "broker", conflicts_with = "id")]
    since: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("delivery {0} does not exist ({1})")]
    NotFound(i64, String),
    #[error("delivery {0} was delivered; replaying it would send a duplicate, so it is refused")]
    AlreadyDelivered(i64),
    #[error("delivery {0} is still pending; it will be attempted without a replay")]
    StillPending(i64),
    #[error("the Kafka offsets query did not finish")]
    KafkaTask(#[source] tokio::task::JoinError),
    #[error("status is incomplete: {0} could not be read (see above)")]
    StatusIncomplete(String),
    #[error("--until ({until}) must be later than --since ({since})")]
    EmptyWindow {
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    },
    #[error(
        "no event with eventId or idempotency key `{0}` in the ledger: it has not been consumed \
         yet, it was not a valid event (see the rejected_messages table), or retention removed \
         it ({1})"
    )]
    UnknownEvent(String, String),
    #[error("broker `{0}` does not exist (no row in the brokers table)")]
    UnknownBroker(String),
    #[error(
        "broker `{broker}` is disabled ({reason}): re-enable it first, or its backfilled \
         deliveries would only be dead-lettered"
    )]
    BrokerDisabled { broker: String, reason: String },
    #[error("could not write the output")]
    Output(#[source] std::io::Error),
    #[error("the offsets command failed")]
    Offsets(#[source] Box<offsets::OffsetsCliError>),
}

/// Writes a whole report to stdout at once; a closed pipe is an error, not a panic.
fn emit(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(CliError::Output)
}

/// `context: error`, then one `caused by:` line per source, as `main` prints fatal errors.
fn chain(context: &str, error: &dyn std::error::Error) -> String {
    let mut message = format!("error: {context}: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    message
}

pub async fn dead_letters(
    ledger: &Ledger,
    retention: &RetentionSettings,
    command: DeadLettersCommand,
) -> Result<(), CliError> {
    // stderr: stdout stays pure JSON for scripts.
    eprintln!("note: {}", crate::retention::kept_note(retention));
    match command {
        DeadLettersCommand::List {
            broker,
            since,
            limit,
            json,
        } => {
            let letters = ledger.dead_letters(broker.as_deref(), since, limit).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&letters).expect("dead letters serialize")
                );
            } else {
                print_table(&letters);
            }
        }
        DeadLettersCommand::Replay(args) => {
            let selector = match (args.id, args.broker) {
                (Some(id), _) => ReplaySelector::Delivery(id),
                (None, Some(broker_id)) => ReplaySelector::Broker {
                    broker_id,
                    since: args.since,
                },
                (None, None) => unreachable!("clap requires --id or --broker"),
            };
            match ledger.replay(&selector).await? {
                ReplayOutcome::Requeued(ids) => println!(
                    "re-queued {} deliveries {:?}; a running service sends them within a few seconds",
                    ids.len(),
                    ids
                ),
                ReplayOutcome::NotFound => {
                    return Err(CliError::NotFound(
                        args.id.unwrap_or(0),
                        crate::retention::kept_note(retention),
                    ))
                }
                ReplayOutcome::AlreadyDelivered => {
                    return Err(CliError::AlreadyDelivered(args.id.unwrap_or(0)))
                }
                ReplayOutcome::StillPending => {
                    return Err(CliError::StillPending(args.id.unwrap_or(0)))
                }
            }
        }
    }
    Ok(())
}

pub async fn backfill(
    ledger: &Ledger,
    retention: &RetentionSettings,
    args: BackfillArgs,
) -> Result<(), CliError> {
    if let Some(until) = args.until.filter(|until| *until <= args.since) {
        return Err(CliError::EmptyWindow {
            since: args.since,
            until,
        });
    }
    let request = BackfillRequest {
        broker_id: args.broker.clone(),
        since: args.since,
        until: args.until,
        load_id: args.load,
        dry_run: args.dry_run,
    };
    eprintln!("note: {}", crate::retention::kept_note(retention));
    let summary = match ledger.backfill(&request).await? {
        BackfillOutcome::Done(summary) => summary,
        BackfillOutcome::UnknownBroker => return Err(CliError::UnknownBroker(args.broker)),
        BackfillOutcome::BrokerDisabled { reason } => {
            return Err(CliError::BrokerDisabled {
                broker: args.broker,
                reason: reason.unwrap_or_else(|| "no reason recorded".to_owned()),
            })
        }
    };
    let text = if args.json {
        format!(
            "{}\n",
            serde_json::to_string(&summary).expect("a summary serializes")
        )
    } else if summary.dry_run {
        format!(
            "dry run: {} deliveries would be created for broker {} ({} events scanned, {} of subscribed loads); nothing was written\n",
            summary.deliveries_created, summary.broker_id, summary.events_scanned, summary.events_subscribed
        )
    } else {
        format!(
            "created {} deliveries for broker {} ({} events scanned, {} of subscribed loads); a running service sends them within a few seconds\n",
            summary.deliveries_created, summary.broker_id, summary.events_scanned, summary.events_subscribed
        )
    };
    emit(&text)
}

fn print_table(letters: &[DeadLetter]) {
    println!(
        "{:>12}  {:<20}  {:<16}  {:<25}  {:>8}  reason",
        "delivery_id", "broker_id", "load_id", "died_at", "attempts"
    );
    for letter in letters {
        println!(
            "{:>12}  {:<20}  {:<16}  {:<25}  {:>8}  {}",
            letter.delivery_id,
            letter.broker_id,
            letter.load_id,
            letter.died_at.format("%Y-%m-%dT%H:%M:%SZ"),
            letter.attempts,
            letter.dead_reason.as_deref().unwrap_or("-")
        );
    }
    println!("{} dead deliveries", letters.len());
}
