//! Command line: `serve`, `migrate` and `dead-letters`.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

use crate::ledger::{DeadLetter, Ledger, LedgerError, ReplayOutcome, ReplaySelector};

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
    /// Apply pending migrations, then consume and deliver until SIGTERM/SIGINT.
    Serve,
    /// Apply pending ledger migrations and exit.
    Migrate,
    /// Inspect and replay deliveries that were given up on.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// List dead deliveries, oldest first.
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
    /// Send dead deliveries again, with a fresh attempt budget and the same webhook-id.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ReplayArgs {
    /// One delivery, by the delivery_id shown by `dead-letters list`.
    #[arg(long)]
    id: Option<i64>,
    /// Every dead delivery of this broker (optionally only since --since).
    #[arg(long)]
    broker: Option<String>,
    #[arg(long, requires = "broker")]
    since: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("delivery {0} does not exist")]
    NotFound(i64),
    #[error("delivery {0} was delivered; replaying it would send a duplicate, so it is refused")]
    AlreadyDelivered(i64),
    #[error("delivery {0} is still pending; it will be attempted without a replay")]
    StillPending(i64),
}

pub async fn dead_letters(ledger: &Ledger, command: DeadLettersCommand) -> Result<(), CliError> {
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
                    "re-queued {} deliveries {:?}; a running service sends them within one ledger sweep",
                    ids.len(),
                    ids
                ),
                ReplayOutcome::NotFound => return Err(CliError::NotFound(args.id.unwrap_or(0))),
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
