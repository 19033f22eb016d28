//! Command line: `serve` and `migrate`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "webhook-delivery",
    version,
    about = "Kafka shipment events to signed broker webhooks"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending migrations, then consume and deliver until SIGTERM/SIGINT.
    Serve {
        /// A TOML file layered over config/base.toml (environment variables still win).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Apply pending ledger migrations and exit.
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}
